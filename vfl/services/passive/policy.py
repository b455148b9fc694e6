"""What B keeps and serves, decided by B's own configuration (never by A's
request): floors on the training a stored model must have had, consent to
small batches, differential privacy B requires, how many models each peer
identity may keep, and how many ids each may have scored.

Why budgets: predictions of many models on the same ids form a linear system
in X_B. Each model gives A u_B = X_B w_B for every id it scores; k models give
X_B W (n x k). Even with secret weights, k >= p_B models give A X_B up to a
p_B x p_B linear transform, and all of it once A knows p_B of B's rows. Below
that rank A still learns a k-dimensional projection: on the bundled breast
data (20 correlated features), with 40 known rows, least squares recovers X_B
with relative error 0.93 / 0.62 / 0.41 / 0 from 1 / 5 / 10 / 20 models
(tests/attacks/test_recover_features.py measures it over gRPC). The default
model budget, p_B // 4 per peer (5 for breast), keeps the error above 0.6.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from prometheus_client.core import GaugeMetricFamily

from vfl.common import prom
from vfl.common.errors import DamagedFile, ResourceExhausted
from vfl.common.storage import read_record, write_record

BUDGETS_KIND = "budgets"


@dataclass(frozen=True)
class PassivePolicy:
    min_learning_rate: float = 1e-4
    min_iterations: int = 10
    allow_small_batch: bool = False
    max_models_per_peer: int = 0  # 0: p_B // 4 (at least 1)
    max_predict_ids_per_model: int = 1_000_000
    predict_ids_per_window: int = 1_000_000
    predict_window_s: float = 86_400.0
    predict_scope: Literal["population", "any"] = "population"
    dp_clip_norm: float = 0.0  # 0: sqrt(p_B)
    dp_share_clip: float = 2.0
    max_dp_epsilon: float = 0.0  # 0: differential privacy not required
    max_alignment_size: int = 10_000_000  # ids per PSI from A: each one is a membership test of A's choosing
    max_open_alignments: int = 2  # PSIs a peer runs at once (each holds B's blinded set in memory)

    def models_per_peer(self, n_features: int) -> int:
        return self.max_models_per_peer or max(1, n_features // 4)


# The sliding window is kept in at most about this many entries.
WINDOW_SLOTS = 1000


class PredictionBudget:
    """Ids scored per peer identity: per model (for its lifetime) and over a
    sliding time window (all models). Persisted before scores are released,
    so a restart of B gives no peer a fresh budget. A damaged budgets file
    is not quarantined (that would reset every budget): B scores nothing,
    with DATA_LOSS naming the file, until the operator restores or removes it."""

    def __init__(self, data_dir: Path, policy: PassivePolicy) -> None:
        self._path = data_dir / "budgets.json"
        self._policy = policy
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data: dict[str, dict[str, object]] = read_record(self._path, BUDGETS_KIND)
        except FileNotFoundError:
            return {}
        except DamagedFile as exc:
            raise DamagedFile(
                self._path,
                exc.reason,
                f"{self._path.name} is damaged ({exc.reason}); it holds every peer's prediction budget, so the "
                "passive party scores nothing until it is restored from a backup, or moved away (which resets "
                "every peer's budget)",
            ) from None
        return data

    def charge(self, peer: str, model_id: str, count: int, now: float | None = None) -> None:
        """Record `count` ids scored for `peer` with `model_id`, or refuse
        (RESOURCE_EXHAUSTED) if that would exceed a budget."""
        now = time.time() if now is None else now
        p = self._policy
        with self._lock:
            data = self._load()
            entry = data.setdefault(peer, {})
            window = [
                (float(t), int(c))
                for t, c in entry.get("window", [])  # type: ignore[attr-defined]
                if float(t) > now - p.predict_window_s
            ]
            models: dict[str, int] = dict(entry.get("models", {}))  # type: ignore[call-overload]
            used_model = models.get(model_id, 0)
            if used_model + count > p.max_predict_ids_per_model:
                prom.PREDICTION_IDS_REFUSED.labels(peer=peer).inc(count)
                raise ResourceExhausted(
                    f"ids: model {model_id!r} has {p.max_predict_ids_per_model - used_model} of its "
                    f"{p.max_predict_ids_per_model} prediction ids left at the passive party, asked for {count} "
                    "(VFL_MAX_PREDICT_IDS_PER_MODEL at B)"
                )
            used_window = sum(c for _, c in window)
            if used_window + count > p.predict_ids_per_window:
                prom.PREDICTION_IDS_REFUSED.labels(peer=peer).inc(count)
                raise ResourceExhausted(
                    f"ids: identity {peer!r} has {p.predict_ids_per_window - used_window} of its "
                    f"{p.predict_ids_per_window} prediction ids per {p.predict_window_s:g} s left at the passive "
                    f"party, asked for {count} (VFL_PREDICT_IDS_PER_WINDOW at B)"
                )
            # The calls of one time slot (window / WINDOW_SLOTS) share one entry,
            # dated by the latest of them: a call counts for at most a slot longer
            # than the window, never shorter, and there are at most about
            # WINDOW_SLOTS entries whatever the call rate. (One entry per call
            # made every call read and rewrite them all: O(calls in the window).)
            slot = p.predict_window_s / WINDOW_SLOTS
            if window and window[-1][0] // slot == now // slot:
                window[-1] = (now, window[-1][1] + count)
            else:
                window.append((now, count))
            models[model_id] = used_model + count
            entry["window"] = window
            entry["models"] = models
            write_record(self._path, BUDGETS_KIND, data)
        prom.PREDICTION_IDS.labels(peer=peer, model=model_id).inc(count)

    def left_metrics(self, now: float | None = None) -> list[GaugeMetricFamily]:
        """vfl_prediction_ids_left{peer, budget, model}: per peer identity, the
        ids left in its window (budget="window", model="") and for each model
        it has had scored (budget="model"; a model never charged has all of
        VFL_MAX_PREDICT_IDS_PER_MODEL). One read of budgets.json; nothing
        while it is damaged (every prediction is refused then)."""
        now = time.time() if now is None else now
        p = self._policy
        gauge = GaugeMetricFamily(
            "vfl_prediction_ids_left",
            "Prediction ids a peer identity has left, in its window (budget=window) and per model (budget=model)",
            labels=["peer", "budget", "model"],
        )
        try:
            with self._lock:
                data = self._load()
        except DamagedFile:
            return [gauge]
        for peer, entry in sorted(data.items()):
            window = cast(list[tuple[float, int]], entry.get("window", []))
            used = sum(int(c) for t, c in window if float(t) > now - p.predict_window_s)
            gauge.add_metric([peer, "window", ""], float(max(0, p.predict_ids_per_window - used)))
            models: dict[str, int] = dict(entry.get("models", {}))  # type: ignore[call-overload]
            for model_id, n in sorted(models.items()):
                gauge.add_metric([peer, "model", model_id], float(max(0, p.max_predict_ids_per_model - int(n))))
        return [gauge]
