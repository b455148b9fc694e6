"""The plain-numpy run that a federated job must reproduce: same data
preparation (each party standardises its own training columns), same initial
weights, same batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common.data import Scaler, load_party_csv
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.batching import batch_schedule, min_batch_size
from vfl.common.protocol.optimizers import OptimizerSettings
from vfl.common.protocol.reference import train_plain, with_intercept


class ReferenceRun:
    """The initial weights are each party's own, read from its own record
    (its model shard), never from the peer; without them (for AUC-only
    comparisons) they are drawn here."""

    def __init__(
        self,
        config: JobConfig,
        train_ids: list[str],
        w0_active: np.ndarray | None = None,
        w0_passive: np.ndarray | None = None,
        active_csv: Path = BUNDLED_ACTIVE,
        passive_csv: Path = BUNDLED_PASSIVE,
    ) -> None:
        self.model = config.residual_model
        self.active = load_party_csv(active_csv, "id", "y")
        self.passive = load_party_csv(passive_csv, "id")
        pos_a = self.active.positions(train_ids, "ids")
        pos_b = self.passive.positions(train_ids, "ids")
        self.scaler_a = Scaler.fit(self.active.features[pos_a], config.standardize)
        self.scaler_b = Scaler.fit(self.passive.features[pos_b], config.standardize)
        xa = self.scaler_a.transform(self.active.features[pos_a])
        xb = self.scaler_b.transform(self.passive.features[pos_b])
        y = self.active.labels[pos_a]
        p_a, p_b = xa.shape[1], xb.shape[1]
        self.batches = batch_schedule(
            len(train_ids),
            config.batch_size,
            config.epochs,
            config.seed,
            min_batch_size(p_a, p_b, config.allow_small_batch),
            config.max_iterations,
        )
        self.trace: list[dict[str, np.ndarray]] = []
        self.x_active, self.x_passive, self.y = xa, xb, y
        self.w_active, self.w_passive = train_plain(
            xa,
            xb,
            y,
            np.random.default_rng(0).normal(0.0, config.init_scale, p_a + 1) if w0_active is None else w0_active,
            np.random.default_rng(1).normal(0.0, config.init_scale, p_b) if w0_passive is None else w0_passive,
            self.batches,
            OptimizerSettings.of(config),
            config.l2,
            self.trace,
            self.model,
        )

    def predict(self, ids: list[str]) -> np.ndarray:
        xa = with_intercept(self.scaler_a.transform(self.active.features[self.active.positions(ids, "ids")]))
        xb = self.scaler_b.transform(self.passive.features[self.passive.positions(ids, "ids")])
        return self.model.link(xa @ self.w_active + xb @ self.w_passive)


def reference_from_shards(
    a_shard: dict, b_shard: dict, config: JobConfig, train_ids: list[str], **csvs: Path
) -> ReferenceRun:
    """The plain run from the initial weights each party recorded in its own
    shard (drawn from its own CSPRNG: nothing else could give them)."""
    return ReferenceRun(
        config,
        train_ids,
        np.asarray(a_shard["initial_weights"], dtype=np.float64),
        np.asarray(b_shard["initial_weights"], dtype=np.float64),
        **csvs,
    )


def assert_weights_close(actual: np.ndarray, desired: np.ndarray, rtol: float = 1e-4) -> None:
    """Federated weights against the plain run: relative error below `rtol`,
    measured against the vector's scale (max |w|). Element by element a
    random initial weight that lands near zero would turn the fixed point's
    ~1e-7 absolute error into a large relative one."""
    desired = np.asarray(desired, dtype=np.float64)
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale)
