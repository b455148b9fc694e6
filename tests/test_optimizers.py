"""Each party's step-5 update rule: the formulas by hand on a few steps,
the schedules, learning on a plain problem, and the checkpoint record."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vfl.common.errors import InvalidArgument
from vfl.common.jobconfig import JobConfig, job_config
from vfl.common.protocol import steps
from vfl.common.protocol.batching import batch_schedule
from vfl.common.protocol.optimizers import (
    OPTIMIZERS,
    OptimizerSettings,
    OptimizerState,
    initial_state,
    learning_rate_at,
    optimizer_update,
    restored_state,
    smallest_learning_rate,
)
from vfl.common.protocol.reference import train_plain, with_intercept

G1, G2 = np.array([0.5, -2.0]), np.array([1.5, 1.0])
W0 = np.array([1.0, 1.0])


def two_updates(settings: OptimizerSettings) -> tuple[np.ndarray, np.ndarray]:
    state = initial_state(settings, 2)
    w1, state = optimizer_update(settings, W0, G1, state)
    w2, state = optimizer_update(settings, w1, G2, state)
    assert state.steps == 2
    return w1, w2


def test_sgd_momentum_and_nesterov_by_hand():
    lr, mu = 0.1, 0.8
    w1, w2 = two_updates(OptimizerSettings("sgd", lr))
    np.testing.assert_allclose(w2, W0 - lr * G1 - lr * G2)
    w1, w2 = two_updates(OptimizerSettings("momentum", lr, momentum=mu))
    v2 = mu * G1 + G2
    np.testing.assert_allclose(w1, W0 - lr * G1)
    np.testing.assert_allclose(w2, w1 - lr * v2)
    w1, w2 = two_updates(OptimizerSettings("nesterov", lr, momentum=mu))
    np.testing.assert_allclose(w1, W0 - lr * (G1 + mu * G1))
    np.testing.assert_allclose(w2, w1 - lr * (G2 + mu * v2))


def test_adaptive_optimisers_by_hand():
    lr, eps = 0.1, 1e-8
    w1, w2 = two_updates(OptimizerSettings("adagrad", lr, epsilon=eps))
    np.testing.assert_allclose(w1, W0 - lr * np.sign(G1), rtol=1e-7)
    np.testing.assert_allclose(w2, w1 - lr * G2 / np.sqrt(G1**2 + G2**2), rtol=1e-7)
    w1, w2 = two_updates(OptimizerSettings("rmsprop", lr, rho=0.9, epsilon=eps))
    e1 = 0.1 * G1**2
    e2 = 0.9 * e1 + 0.1 * G2**2
    np.testing.assert_allclose(w1, W0 - lr * G1 / np.sqrt(e1), rtol=1e-7)
    np.testing.assert_allclose(w2, w1 - lr * G2 / np.sqrt(e2), rtol=1e-7)
    b1, b2 = 0.9, 0.999
    w1, w2 = two_updates(OptimizerSettings("adam", lr, beta1=b1, beta2=b2, epsilon=eps))
    np.testing.assert_allclose(w1, W0 - lr * np.sign(G1), rtol=1e-7)  # bias-corrected: |step| = lr at first
    m2 = (b1 * (1 - b1) * G1 + (1 - b1) * G2) / (1 - b1**2)
    v2 = (b2 * (1 - b2) * G1**2 + (1 - b2) * G2**2) / (1 - b2**2)
    np.testing.assert_allclose(w2, w1 - lr * m2 / np.sqrt(v2), rtol=1e-7)


@pytest.mark.parametrize(
    ("decay", "rate", "expected"),
    [
        ("none", 0.5, [0.2, 0.2, 0.2, 0.2]),
        ("step", 0.5, [0.2, 0.2, 0.1, 0.1]),
        ("exponential", 0.25, [0.2, 0.1, 0.05, 0.025]),
        ("inverse_time", 1.0, [0.2, 0.2 / 1.5, 0.1, 0.2 / 2.5]),
    ],
)
def test_learning_rate_schedules(decay, rate, expected):
    settings = OptimizerSettings("sgd", 0.2, decay=decay, decay_rate=rate, decay_steps=2)
    got = [learning_rate_at(settings, t) for t in range(4)]
    np.testing.assert_allclose(got, expected)
    assert smallest_learning_rate(settings, 4) == pytest.approx(expected[-1])
    # The schedule is what the update applies.
    w = np.zeros(1)
    state = initial_state(settings, 1)
    for t in range(4):
        w_next, state = optimizer_update(settings, w, np.ones(1), state)
        assert w - w_next == pytest.approx(expected[t])
        w = w_next


@pytest.mark.parametrize(("name", "decay"), [(n, "exponential") for n in OPTIMIZERS] + [("sgd", "none")])
def test_every_optimiser_learns_a_separable_problem(name, decay):
    """The plain reference (train_plain) learns with each rule."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 6))
    y = (x @ rng.normal(size=6) + 0.3 * rng.normal(size=400) > 0).astype(float)
    sched = batch_schedule(400, 64, 5, seed=0, min_batch=18)
    lr = {"sgd": 0.3, "momentum": 0.05, "nesterov": 0.05}.get(name, 0.05)
    wa, wb = train_plain(
        x[:, :3],
        x[:, 3:],
        y,
        steps.private_initial_weights(4, 0.01),
        steps.private_initial_weights(3, 0.01),
        sched,
        OptimizerSettings(name, lr, decay=decay, decay_rate=0.9, decay_steps=10),
        0.0,
    )
    acc = np.mean(((with_intercept(x[:, :3]) @ wa + x[:, 3:] @ wb) > 0) == y)
    assert acc > 0.85, name


def test_optimisers_differ_from_each_other():
    """A rule that silently fell back to SGD would pass the learning test."""
    ends = {name: tuple(two_updates(OptimizerSettings(name, 0.1))[1]) for name in OPTIMIZERS}
    assert len(set(ends.values())) == len(OPTIMIZERS)


def test_checkpoint_record_round_trips_and_is_checked():
    settings = OptimizerSettings("adam", 0.1)
    state = initial_state(settings, 2)
    _, state = optimizer_update(settings, W0, G1, state)
    back = OptimizerState.from_record(state.to_record(), settings, 2)
    assert back.steps == 1
    np.testing.assert_array_equal(back.first, state.first)
    np.testing.assert_array_equal(back.second, state.second)
    with pytest.raises(ValueError, match="optimizer.first: expected 3 finite values"):
        OptimizerState.from_record(state.to_record(), settings, 3)
    with pytest.raises(ValueError, match="optimizer.second: momentum keeps no such state"):
        OptimizerState.from_record(state.to_record(), OptimizerSettings("momentum"), 2)
    bad = state.to_record() | {"first": [math.nan, 0.0]}
    with pytest.raises(ValueError, match="optimizer.first"):
        OptimizerState.from_record(bad, settings, 2)
    # A checkpoint from before optimisers: fine for SGD, refused for the rest.
    assert restored_state(None, OptimizerSettings("sgd"), 2, 7).steps == 7
    with pytest.raises(ValueError, match="no state for adam"):
        restored_state(None, settings, 2, 7)


def test_config_names_the_bad_optimiser_field():
    assert JobConfig().optimizer == "sgd" and JobConfig().lr_decay == "none"
    with pytest.raises(InvalidArgument, match=r"^config\.optimizer: Input should be 'sgd'"):
        job_config(optimizer="lbfgs")
    with pytest.raises(InvalidArgument, match=r"^config\.lr_decay: "):
        job_config(lr_decay="cosine")
    with pytest.raises(InvalidArgument, match=r"^config\.beta2: "):
        job_config(optimizer="adam", beta2=1.0)
    with pytest.raises(InvalidArgument, match=r"^config\.decay_rate: expected at most 1 for step decay"):
        job_config(lr_decay="step", decay_rate=2.0)
    assert job_config(lr_decay="inverse_time", decay_rate=2.0).decay_rate == 2.0
