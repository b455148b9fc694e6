"""The degree-5 polynomial residual (POLY5, docs/POLY5.md) through the
protocol sessions of vfl/common/protocol/sessions.py: one active and one
passive party in one process with real 1024-bit OU keys (the masked
gradients of the polynomial shares need 266 plaintext bits; 512-bit OU keys
have 169). The federated weights equal the plain run of the same residual
(train_plain(..., model=POLY5)); step 0 keeps the sessions' rules; k = 2 and
small keys are refused; and what A decrypts in step 0 is the cross term
plus B's mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from tests.reference_run import assert_weights_close
from tests.test_sessions import BACKEND, breast, keys
from vfl.common.crypto.backend import MASK_STATISTICAL_BITS, CipherVector
from vfl.common.crypto.fixedpoint import signed
from vfl.common.errors import FailedPrecondition, InvalidArgument, OutOfRange
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol import steps
from vfl.common.protocol.batching import Batch, batch_schedule, coalition_feature_counts, min_batch_size
from vfl.common.protocol.reference import train_plain
from vfl.common.protocol.residual import POLY5
from vfl.common.protocol.sessions import ACTIVE, ActiveSession, PartyInfo, PassiveSession, TrainingPlan

BASE = JobConfig(epochs=2, batch_size=64, learning_rate=0.15, l2=0.01, seed=5)


@dataclass
class Pair:
    active: ActiveSession
    passive: PassiveSession
    w0_active: np.ndarray
    w0_passive: np.ndarray
    rows: list[np.ndarray]


def pair(config: JobConfig = BASE, port: object | None = None) -> Pair:
    xa, y, xb = breast()
    ka, kb = keys(2)
    plan = TrainingPlan.of(config, POLY5)
    rng = np.random.default_rng(1)
    w0_a, w0_b = rng.normal(0, 0.01, xa.shape[1]), rng.normal(0, 0.01, xb.shape[1])
    b_info = PartyInfo("b1", kb.public, xb.shape[1])
    passive = PassiveSession("b1", BACKEND, kb, xb, w0_b, plan, PartyInfo(ACTIVE, ka.public, xa.shape[1] - 1), [])
    active = ActiveSession(BACKEND, ka, xa, y, w0_a, plan, [b_info], {"b1": port or passive})  # type: ignore[dict-item]
    pa, pb = coalition_feature_counts(xa.shape[1] - 1, [xb.shape[1]])
    floor = min_batch_size(pa, pb, config.allow_small_batch)
    batches = batch_schedule(len(y), config.batch_size, config.epochs, config.seed, floor, config.max_iterations)
    return Pair(active, passive, w0_a, w0_b, [b.rows for b in batches])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_poly5_sessions_match_the_plain_poly5_run(optimizer: str) -> None:
    config = BASE.model_copy(update={"optimizer": optimizer, "learning_rate": 0.15 if optimizer == "sgd" else 0.05})
    fed = pair(config)
    for t, r in enumerate(fed.rows):
        fed.active.iteration(t, r.tolist())
    xa, y, xb = breast()
    wa, wb = train_plain(
        xa[:, :-1],
        xb,
        y,
        fed.w0_active,
        fed.w0_passive,
        [Batch(0, r) for r in fed.rows],
        TrainingPlan.of(config).optimizer,
        config.l2,
        model=POLY5,
    )
    assert_weights_close(fed.active.w, wa)
    assert_weights_close(fed.passive.w, wb)
    assert np.linalg.norm(fed.active.w - fed.w0_active) > 0.1  # it learned
    # And the polynomial run is not the Taylor one: the residuals differ.
    wa_taylor, _ = train_plain(
        xa[:, :-1],
        xb,
        y,
        fed.w0_active,
        fed.w0_passive,
        [Batch(0, r) for r in fed.rows],
        TrainingPlan.of(config).optimizer,
        config.l2,
    )
    assert np.max(np.abs(wa_taylor - wa)) > 1e-3


def powers_for(fed: Pair, t: int, shift: float = 0.0) -> CipherVector:
    xa, _, _ = breast()
    u_a = xa[fed.rows[t]] @ fed.active.w + shift
    return steps.encrypted_score_powers(BACKEND, keys(2)[0].public, u_a, POLY5)


def test_step0_order_replay_and_a_second_different_request() -> None:
    fed = pair()
    b = fed.passive
    r = fed.rows[0].tolist()
    xa, y, _ = breast()
    a_enc = steps.first_encrypted_data(BACKEND, keys(2)[0].public, np.zeros(len(r)))
    with pytest.raises(FailedPrecondition, match="before step 0"):
        b.exchange_residual_shares(0, r, a_enc)
    with pytest.raises(FailedPrecondition, match="expected 0, got 1"):
        b.exchange_score_powers(1, r, powers_for(fed, 0))
    wrong_key = steps.encrypted_score_powers(BACKEND, keys(2)[1].public, np.zeros(len(r)), POLY5)
    with pytest.raises(Exception, match="under key"):
        b.exchange_score_powers(0, r, wrong_key)
    powers = powers_for(fed, 0)
    first = b.exchange_score_powers(0, r, powers)
    assert b.exchange_score_powers(0, r, powers) is first  # a retry: replayed
    with pytest.raises(FailedPrecondition, match="second, different request for its cross terms"):
        b.exchange_score_powers(0, r, powers_for(fed, 0))  # fresh randomness: a different request
    with pytest.raises(FailedPrecondition, match="second, different request for its cross terms"):
        b.exchange_score_powers(0, fed.rows[1].tolist(), powers)
    # Steps 1-2 on other rows than step 0's are refused, then the right ones go through.
    with pytest.raises(InvalidArgument, match="step 0 was for other rows"):
        b.exchange_residual_shares(0, fed.rows[1][: len(r)].tolist(), a_enc)
    shares = b.exchange_residual_shares(0, r, a_enc)
    assert b.exchange_score_powers(0, r, powers) is first  # still replayed after steps 1-2
    assert len(shares) == len(r)


def test_a_full_iteration_asks_step0_once_and_b_then_refuses_it() -> None:
    calls: list[int] = []

    class Counting:
        def __init__(self) -> None:
            self.inner: PassiveSession | None = None

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def exchange_score_powers(self, t: int, rows: Sequence[int], powers: CipherVector) -> CipherVector:
            calls.append(t)
            assert self.inner is not None
            return self.inner.exchange_score_powers(t, rows, powers)

    port = Counting()
    fed = pair(port=port)
    port.inner = fed.passive
    fed.active.iteration(0, fed.rows[0].tolist())
    fed.active.iteration(1, fed.rows[1].tolist())
    assert calls == [0, 1]
    with pytest.raises(FailedPrecondition, match="expected 2, got 1"):
        fed.passive.exchange_score_powers(1, fed.rows[1].tolist(), powers_for(fed, 1))


def test_step0_is_refused_for_the_taylor_residual() -> None:
    xa, _, xb = breast()
    ka, kb = keys(2)
    b = PassiveSession(
        "b1", BACKEND, kb, xb, np.zeros(xb.shape[1]), TrainingPlan.of(BASE), PartyInfo(ACTIVE, ka.public, 0), []
    )
    with pytest.raises(FailedPrecondition, match="residual is logistic, not a polynomial"):
        b.exchange_score_powers(0, [0, 1], steps.encrypted_score_powers(BACKEND, ka.public, np.zeros(2), POLY5))


def test_two_passive_parties_are_refused_with_poly5() -> None:
    xa, y, xb = breast()
    ka, k1, k2 = keys(3)
    plan = TrainingPlan.of(BASE, POLY5)
    infos = [PartyInfo("b1", k1.public, 5), PartyInfo("b2", k2.public, 5)]
    with pytest.raises(InvalidArgument, match="residual poly5: one passive party only"):
        ActiveSession(BACKEND, ka, xa, y, np.zeros(xa.shape[1]), plan, infos, {"b1": object(), "b2": object()})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument, match="residual poly5: one passive party only"):
        PassiveSession("b1", BACKEND, k1, xb[:, :5], np.zeros(5), plan, PartyInfo(ACTIVE, ka.public, 0), infos[1:])


def test_keys_too_small_for_poly5_are_refused() -> None:
    xa, y, xb = breast()
    small = BACKEND.generate_keypair(512)  # OU: 169 plaintext bits
    ka, kb = keys(2)
    plan = TrainingPlan.of(BASE, POLY5)
    with pytest.raises(
        OutOfRange,
        match=r"residual poly5: the 5\d\d-bit key of active has 169 plaintext bits, its masked gradients need 266",
    ):
        ActiveSession(
            BACKEND, small, xa, y, np.zeros(xa.shape[1]), plan, [PartyInfo("b1", kb.public, 1)], {"b1": object()}
        )  # type: ignore[dict-item]
    with pytest.raises(
        OutOfRange,
        match=r"residual poly5: the 5\d\d-bit key of b1 has 169 plaintext bits, its masked gradients need 266",
    ):
        PassiveSession("b1", BACKEND, small, xb, np.zeros(xb.shape[1]), plan, PartyInfo(ACTIVE, ka.public, 0), [])
    # The Taylor residual is fine with them.
    PassiveSession(
        "b1", BACKEND, small, xb, np.zeros(xb.shape[1]), TrainingPlan.of(BASE), PartyInfo(ACTIVE, ka.public, 0), []
    )


def test_what_a_decrypts_in_step0_is_the_cross_term_plus_bs_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """A's step-0 decryption minus the true cross term (from both parties'
    scores, at scale 2^64) is B's mask s, uniform over cross bits + 80 bits:
    every value differs from the truth by far more than any cross term.
    (Planting a zero mask in masked_cross_terms makes this test fail.)"""
    seen: list[tuple[np.ndarray, np.ndarray, CipherVector, tuple[int, ...]]] = []
    masks: list[tuple[int, ...]] = []
    fed = pair()
    xa, _, _ = breast()
    original_cross = steps.masked_cross_terms

    def keep_mask(*args: object) -> steps.MaskedCross:
        out = original_cross(*args)  # type: ignore[arg-type]
        masks.append(out.mask)
        return out

    monkeypatch.setattr(steps, "masked_cross_terms", keep_mask)
    b = fed.passive
    original = b.exchange_score_powers

    def spy(t: int, rows: Sequence[int], powers: CipherVector) -> CipherVector:
        u_a, u_b = xa[rows] @ fed.active.w, b.x[rows] @ b.w  # before this iteration's updates
        reply = original(t, rows, powers)
        seen.append((u_a, u_b, reply, masks[-1]))
        return reply

    monkeypatch.setattr(b, "exchange_score_powers", spy)
    for t in range(3):
        fed.active.iteration(t, fed.rows[t].tolist())
    ka = keys(2)[0]
    bits = steps.cross_term_bits(POLY5)
    for u_a, u_b, reply, mask in seen:
        decrypted = signed(BACKEND.decrypt(ka, reply), ka.plaintext_modulus)
        truth = [int(round(v * 2.0**steps.CROSS_SCALE_BITS)) for v in POLY5.cross(u_a, u_b)]
        gap = [d - c for d, c in zip(decrypted, truth, strict=True)]
        # The gap is B's mask, up to the fixed-point rounding of powers and weights ...
        assert all(abs(g - s) < 2 ** (steps.CROSS_SCALE_BITS - 16) for g, s in zip(gap, mask, strict=True))
        # ... and it hides the cross term: far beyond any |cross| (< 2^bits at this scale).
        assert min(abs(g) for g in gap).bit_length() > bits + MASK_STATISTICAL_BITS - 24, "A reads the cross term"


def test_step5_needs_the_exact_integer_sum() -> None:
    """The shares after step 0 are ~2^104 in real units and cancel in
    X^T (a + b): summed as integers (what update_own_weights_exact does) the
    result is the plain X^T (P(u) - y); through float64 it is lost entirely."""
    ka = keys(2)[0]
    rng = np.random.default_rng(3)
    m = 64
    x, u_a, u_b = rng.normal(size=(m, 3)), rng.normal(0, 2, m), rng.normal(0, 2, m)
    y = (rng.random(m) < 0.5).astype(float)
    powers = steps.encrypted_score_powers(BACKEND, ka.public, u_a, POLY5)
    masked = steps.masked_cross_terms(BACKEND, powers, u_b, POLY5)
    a = steps.active_poly_share(BACKEND, ka, masked.ciphers, u_a, y, POLY5)
    b = steps.passive_poly_share(u_b, masked.mask, POLY5)
    fixed = steps.fixed_transpose(x)
    exact = fixed.dot(np.array(a, dtype=object)) + fixed.dot(np.array(b, dtype=object))
    plain = x.T @ (POLY5.value(u_a + u_b) - y)
    np.testing.assert_allclose([v / 2**48 for v in exact], plain, rtol=1e-4)
    as_float = x.T @ (np.array([float(v) for v in a]) + np.array([float(v) for v in b])) / 2**32
    lossy = x.T @ np.array([float(v) for v in a]) / 2**32 + x.T @ np.array([float(v) for v in b]) / 2**32
    assert np.max(np.abs(lossy - plain)) > 0.1 and np.max(np.abs(as_float - plain)) > 0.1
