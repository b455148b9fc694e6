"""A's checkpoint of a running job, as typed records: the set-up
(`<job>.setup.json`, written once) and the state (`<job>.state.json`,
written before each of B's step 5). `from_record` refuses (KeyError,
TypeError, ValueError) a record it cannot use; the caller reports the job
as one that cannot resume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def _vector(values: Any, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or not np.all(np.isfinite(v)):
        raise ValueError(f"{what}: expected a vector of finite numbers")
    return v


def _optional_vector(values: Any, what: str) -> np.ndarray | None:
    return None if values is None else _vector(values, what)


def _optional_record(value: Any, what: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{what}: expected a record")
    return value


def _history(values: Any) -> list[tuple[int, float]]:
    return [(int(i), float(v)) for i, v in values]


@dataclass(frozen=True)
class ActiveSetup:
    """What A fixed when the job started."""

    job_id: str
    config: dict[str, Any]  # JobConfig.model_dump()
    train_ids: list[str]
    holdout_ids: list[str]
    alignment_id: str
    scores_any_row: bool
    target_fingerprint: bytes
    passive_key: dict[str, Any]  # PublicKey.to_dict()
    p_passive: int
    started: float
    w0: np.ndarray
    dp: dict[str, float] | None  # DpTerms.to_dict()

    def to_record(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "config": self.config,
            "train_ids": self.train_ids,
            "holdout_ids": self.holdout_ids,
            "alignment_id": self.alignment_id,
            "scores_any_row": self.scores_any_row,
            "target_fingerprint": self.target_fingerprint.hex(),
            "passive_key": self.passive_key,
            "p_passive": self.p_passive,
            "started": self.started,
            "w0": self.w0.tolist(),
            "dp": self.dp,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> ActiveSetup:
        dp = _optional_record(r["dp"], "dp")
        return cls(
            job_id=str(r["job_id"]),
            config=dict(r["config"]),
            train_ids=[str(i) for i in r["train_ids"]],
            holdout_ids=[str(i) for i in r["holdout_ids"]],
            alignment_id=str(r.get("alignment_id", "")),
            scores_any_row=bool(r.get("scores_any_row")),
            target_fingerprint=bytes.fromhex(r["target_fingerprint"]),
            passive_key=dict(r["passive_key"]),
            p_passive=int(r["p_passive"]),
            started=float(r["started"]),
            w0=_vector(r["w0"], "w0"),
            dp=None if dp is None else {k: float(v) for k, v in dp.items()},
        )


@dataclass(frozen=True)
class ActiveState:
    """Where A's loop stands: what it needs to resume bit for bit."""

    next_iteration: int
    w: np.ndarray
    prev_w: np.ndarray | None  # w before the last own update (B may have to redo it)
    optimizer: dict[str, Any] | None  # OptimizerState.to_record()
    prev_optimizer: dict[str, Any] | None
    validation_losses: list[tuple[int, float]]
    best_iteration: int | None
    best_loss: float | None
    best_w: np.ndarray | None
    stale_checks: int
    pending_z_b: list[int] | None  # B's step 5 of the previous iteration, not confirmed yet
    epoch: int
    loss: float | None
    losses: list[tuple[int, float]]
    released_at: int
    extra_releases: int

    def to_record(self) -> dict[str, Any]:
        return {
            "next_iteration": self.next_iteration,
            "w": self.w.tolist(),
            "prev_w": None if self.prev_w is None else self.prev_w.tolist(),
            "optimizer": self.optimizer,
            "validation_losses": list(self.validation_losses),
            "best_iteration": self.best_iteration,
            "best_loss": self.best_loss,
            "best_w": None if self.best_w is None else self.best_w.tolist(),
            "stale_checks": self.stale_checks,
            "prev_optimizer": self.prev_optimizer,
            "pending_z_b": None if self.pending_z_b is None else [f"{v:x}" for v in self.pending_z_b],
            "epoch": self.epoch,
            "loss": self.loss,
            "losses": list(self.losses),
            "released_at": self.released_at,
            "extra_releases": self.extra_releases,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> ActiveState:
        best, best_loss, loss, pending = r.get("best_iteration"), r.get("best_loss"), r["loss"], r["pending_z_b"]
        return cls(
            next_iteration=int(r["next_iteration"]),
            w=_vector(r["w"], "w"),
            prev_w=_optional_vector(r["prev_w"], "prev_w"),
            optimizer=_optional_record(r.get("optimizer"), "optimizer"),
            prev_optimizer=_optional_record(r.get("prev_optimizer"), "prev_optimizer"),
            validation_losses=_history(r.get("validation_losses", [])),
            best_iteration=None if best is None else int(best),
            best_loss=None if best_loss is None else float(best_loss),
            best_w=_optional_vector(r.get("best_w"), "best_w"),
            stale_checks=int(r.get("stale_checks", 0)),
            pending_z_b=None if pending is None else [int(v, 16) for v in pending],
            epoch=int(r["epoch"]),
            loss=None if loss is None else float(loss),
            losses=_history(r["losses"]),
            released_at=int(r["released_at"]),
            extra_releases=int(r["extra_releases"]),
        )
