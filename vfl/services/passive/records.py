"""B's checkpoint of a running job, as a typed record: what `<job>.state.json`
holds (vfl/common/checkpoint.py), written after every step 5 and before every
release of z_A. `from_record` refuses (KeyError, TypeError, ValueError) a
record it cannot use; the caller reports the job as one that cannot resume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def _weights(values: Any, what: str) -> np.ndarray:
    w = np.asarray(values, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)):
        raise ValueError(f"{what}: expected a vector of finite weights")
    return w


@dataclass(frozen=True)
class PassiveState:
    iteration: int  # the iteration B expects next: every earlier one is applied to w
    w: np.ndarray
    optimizer: dict[str, Any] | None  # OptimizerState.to_record(); None before the first update
    candidates: dict[int, np.ndarray]  # validation: w of the checked iterations A may still keep
    last_update_sq_norm: float | None
    last_apply: tuple[int, bytes, float] | None  # the last step 5: iteration, request digest, answer
    restarts: int
    restarted_at: int
    released_at: int  # the last iteration whose z_A left B

    def to_record(self) -> dict[str, Any]:
        last = self.last_apply
        return {
            "iteration": self.iteration,
            "w": self.w.tolist(),
            "optimizer": self.optimizer,
            "candidates": {str(t): w.tolist() for t, w in self.candidates.items()},
            "last_update_sq_norm": self.last_update_sq_norm,
            "last_apply": None if last is None else [last[0], last[1].hex(), last[2]],
            "restarts": self.restarts,
            "restarted_at": self.restarted_at,
            "released_at": self.released_at,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PassiveState:
        w = _weights(record["w"], "w")
        candidates = {int(t): _weights(v, "candidates") for t, v in (record.get("candidates") or {}).items()}
        if any(v.shape != w.shape for v in candidates.values()):
            raise ValueError("candidates: weights of another width")
        last = record["last_apply"]
        optimizer = record.get("optimizer")
        if optimizer is not None and not isinstance(optimizer, dict):
            raise TypeError("optimizer: expected a record")
        norm = record["last_update_sq_norm"]
        return cls(
            iteration=int(record["iteration"]),
            w=w,
            optimizer=optimizer,
            candidates=candidates,
            last_update_sq_norm=None if norm is None else float(norm),
            last_apply=None if last is None else (int(last[0]), bytes.fromhex(last[1]), float(last[2])),
            restarts=int(record["restarts"]),
            restarted_at=int(record["restarted_at"]),
            released_at=int(record["released_at"]),
        )
