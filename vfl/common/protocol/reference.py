"""The same algorithm in plain numpy on the joined data: the reference the
federated model is tested against (same batches; the initial weights are
given, as each party drew them privately and recorded them in its own shard)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vfl.common.protocol.batching import Batch
from vfl.common.protocol.optimizers import OptimizerSettings, initial_state, optimizer_update
from vfl.common.protocol.residual import LOGISTIC, PolynomialResidual, ResidualModel
from vfl.common.protocol.steps import (
    active_residual_share,
    gradient_from_shares,
    passive_residual_share,
    with_intercept,
)

__all__ = ["train_plain", "with_intercept"]


def train_plain(
    x_active: np.ndarray,
    x_passive: np.ndarray,
    y: np.ndarray,
    w_active: np.ndarray,
    w_passive: np.ndarray,
    batches: Sequence[Batch],
    optimizer: OptimizerSettings,
    l2: float,
    trace: list[dict[str, np.ndarray]] | None = None,
    model: ResidualModel | PolynomialResidual = LOGISTIC,
) -> tuple[np.ndarray, np.ndarray]:
    """Mini-batch training on the model's residual (the Taylor one for
    logistic regression), each party's weights with its own optimiser state;
    w_active includes the intercept last.
    If `trace` is given, each iteration's secrets are appended to it (tests
    check that no party ever receives them)."""
    xa = with_intercept(x_active)
    pen_a = np.r_[np.ones(x_active.shape[1]), 0.0]
    pen_b = np.ones(x_passive.shape[1])
    state_a, state_b = initial_state(optimizer, len(w_active)), initial_state(optimizer, len(w_passive))
    for batch in batches:
        s = batch.rows
        if isinstance(model, PolynomialResidual):
            # The shares step 0 gives, without the mask (it cancels).
            u_a, u_b = xa[s] @ w_active, x_passive[s] @ w_passive
            a = model.coefficients[0] + model.own(u_a) - y[s] + model.cross(u_a, u_b)
            b = model.own(u_b)
        else:
            a = active_residual_share(xa[s], w_active, y[s], model)
            b = passive_residual_share(x_passive[s], w_passive, model)
        h_a, h_b = xa[s].T @ b, x_passive[s].T @ a
        if trace is not None:
            trace.append(
                {"a": a, "b": b, "h_active": h_a, "h_passive": h_b, "w_active": w_active, "w_passive": w_passive}
            )
        g_a = gradient_from_shares(xa[s], a, h_a, w_active, l2, pen_a)
        g_b = gradient_from_shares(x_passive[s], b, h_b, w_passive, l2, pen_b)
        w_active, state_a = optimizer_update(optimizer, w_active, g_a, state_a)
        w_passive, state_b = optimizer_update(optimizer, w_passive, g_b, state_b)
    return w_active, w_passive
