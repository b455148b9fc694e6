"""Each protocol step of PROTOCOL.md against the same step in plain numpy,
with real Paillier keys (test-size) and no network."""

from __future__ import annotations

import numpy as np
import pytest

from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import PublicKey, target_fingerprint, unmask
from vfl.common.crypto.fixedpoint import FEATURE_SCALE_BITS, RESIDUAL_SCALE_BITS, signed
from vfl.common.errors import FailedPrecondition, InvalidArgument, OutOfRange
from vfl.common.protocol import steps
from vfl.common.protocol.batching import batch_schedule, check_batch_size, min_batch_size
from vfl.common.protocol.reference import with_intercept
from vfl.common.protocol.residual import LINEAR

# Test-size keys per backend (OU's plaintext space is a third of its modulus).
BITS = {"phe": 512, "paillier": 512, "ou": 1024}


@pytest.fixture(scope="module", params=sorted(BITS))
def backend(request):
    return get_backend(request.param)


@pytest.fixture(scope="module")
def keys(backend):
    bits = BITS[backend.name]
    return backend.generate_keypair(bits), backend.generate_keypair(bits)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(7)
    m, pa, pb = 24, 3, 4
    xa = with_intercept(rng.normal(size=(m, pa)))
    xb = rng.normal(size=(m, pb))
    y = rng.integers(0, 2, size=m).astype(float)
    wa = rng.normal(0, 0.3, size=pa + 1)
    wb = rng.normal(0, 0.3, size=pb)
    return xa, xb, y, wa, wb


def test_shares_are_the_taylor_residual_split(batch):
    xa, xb, y, wa, wb = batch
    a = steps.active_residual_share(xa, wa, y)
    b = steps.passive_residual_share(xb, wb)
    u = xa @ wa + xb @ wb
    np.testing.assert_allclose(a + b, u / 4 + 0.5 - y, rtol=0, atol=1e-12)


def test_one_iteration_matches_numpy(backend, keys, batch):
    sk_a, sk_b = keys
    xa, xb, y, wa, wb = batch
    m = len(y)
    a = steps.active_residual_share(xa, wa, y)
    b = steps.passive_residual_share(xb, wb)
    # Steps 1-2.
    a_enc = steps.first_encrypted_data(backend, sk_a.public, a)
    b_enc = steps.first_intermediate_share(backend, sk_b.public, b)
    # Step 3.
    grad_a = steps.masked_encrypted_gradient(backend, xa, b_enc)
    grad_b = steps.masked_encrypted_gradient(backend, xb, a_enc)
    assert grad_a.ciphers.key == sk_b.public and grad_b.ciphers.key == sk_a.public
    # Step 4: each decrypts the other's masked vector.
    z_a = steps.decrypt_masked_gradient(backend, sk_b, grad_a.ciphers, xa.shape[1])
    z_b = steps.decrypt_masked_gradient(backend, sk_a, grad_b.ciphers, xb.shape[1])
    # What the decrypting party sees is masked: read at the product's own
    # scale (features 2^16 x residuals 2^32), no value is near the cross
    # gradient; with the mask removed every value is (the check can fail).
    scale = float(1 << (FEATURE_SCALE_BITS + RESIDUAL_SCALE_BITS))
    seen = np.array(signed(z_a, sk_b.plaintext_modulus), dtype=float) / scale
    assert np.all(np.abs(seen - xa.T @ b) > 1e3)
    unmasked = np.array(signed(unmask(sk_b.public, z_a, grad_a.mask), sk_b.plaintext_modulus), dtype=float) / scale
    np.testing.assert_allclose(unmasked, xa.T @ b, atol=1e-3)
    # Step 5.
    h_a = steps.unmask_gradient(z_a, grad_a.mask, sk_b.public, steps.cross_gradient_bound(xa))
    h_b = steps.unmask_gradient(z_b, grad_b.mask, sk_a.public, steps.cross_gradient_bound(xb))
    np.testing.assert_allclose(h_a, xa.T @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_b, xb.T @ a, rtol=1e-5, atol=1e-5)
    pen = np.r_[np.ones(xa.shape[1] - 1), 0.0]
    g_a = steps.gradient_from_shares(xa, a, h_a, wa, 0.1, pen)
    np.testing.assert_allclose(g_a, xa.T @ (a + b) / m + 0.1 * wa * pen, rtol=1e-5, atol=1e-6)


def test_loss_share_matches_numpy(backend, keys, batch):
    sk_a, _ = keys
    xa, xb, y, wa, wb = batch
    a = steps.active_residual_share(xa, wa, y)
    u_a, u_b = xa @ wa, xb @ wb
    share = steps.passive_loss_share(backend, steps.first_encrypted_data(backend, sk_a.public, a), u_b)
    loss = steps.active_loss(u_a, y, share, backend, sk_a)
    u = u_a + u_b
    expected = np.mean(np.log(2) - (2 * y - 1) * u / 2 + u**2 / 8)
    assert loss == pytest.approx(expected, rel=1e-7)


def test_linear_loss_share_and_prediction_match_numpy(backend, keys, batch):
    """Linear regression: a = u_A - y, b = u_B; B's loss share carries
    sum a u_B + sum u_B^2 / 2; prediction is u itself."""
    sk_a, _ = keys
    xa, xb, _, wa, wb = batch
    y = np.random.default_rng(9).normal(3.0, 2.0, size=len(xa))
    a = steps.active_residual_share(xa, wa, y, LINEAR)
    b = steps.passive_residual_share(xb, wb, LINEAR)
    u_a, u_b = xa @ wa, xb @ wb
    np.testing.assert_allclose(a + b, u_a + u_b - y)
    share = steps.passive_loss_share(backend, steps.first_encrypted_data(backend, sk_a.public, a), u_b, LINEAR)
    loss = steps.active_loss(u_a, y, share, backend, sk_a, LINEAR)
    assert loss == pytest.approx(np.mean((u_a + u_b - y) ** 2) / 2, rel=1e-7)
    # The Taylor coefficients on the same share give another number.
    assert steps.active_loss(u_a, y, share, backend, sk_a) != pytest.approx(loss, rel=1e-3)
    target = steps.target_prediction_data(backend, steps.third_encrypted_data(backend, sk_a.public, u_a), u_b)
    values = steps.decrypt_prediction(backend, sk_a, target, len(u_a), LINEAR)
    np.testing.assert_allclose(values, u_a + u_b, rtol=0, atol=1e-6)


def test_prediction_matches_numpy(backend, keys, batch):
    sk_a, _ = keys
    xa, xb, _, wa, wb = batch
    u_a, u_b = xa @ wa, xb @ wb
    enc = steps.third_encrypted_data(backend, sk_a.public, u_a)
    target = steps.target_prediction_data(backend, enc, u_b)
    assert set(target.values).isdisjoint(enc.values)  # re-randomised
    probs = steps.decrypt_prediction(backend, sk_a, target, len(u_a))
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-(u_a + u_b))), rtol=0, atol=1e-6)


def test_masked_gradient_refuses_wrong_key_and_length(backend, keys, batch):
    sk_a, sk_b = keys
    xa, _, y, wa, _ = batch
    a_enc = steps.first_encrypted_data(backend, sk_a.public, steps.active_residual_share(xa, wa, y))
    with pytest.raises(FailedPrecondition, match="under key"):
        steps.decrypt_masked_gradient(backend, sk_b, a_enc, len(a_enc))
    with pytest.raises(InvalidArgument, match="expected 3 ciphertexts"):
        steps.decrypt_masked_gradient(backend, sk_a, a_enc, 3)


def test_unmask_refuses_out_of_range(keys):
    _, sk_b = keys
    n = sk_b.public.n
    with pytest.raises(OutOfRange):
        steps.unmask_gradient([n // 3], (0,), sk_b.public, bound=10.0)


def test_encoding_refuses_nan_and_overflow(backend, keys):
    sk_a, _ = keys
    with pytest.raises(OutOfRange, match="finite"):
        steps.encrypt_share(backend, sk_a.public, np.array([np.nan]))
    with pytest.raises(OutOfRange, match="bound"):
        steps.encrypt_share(backend, sk_a.public, np.array([2.0**40]))


def test_capacity_check_refuses_tiny_key():
    # Only the modulus size matters; realistic batches fit any allowed key.
    small = PublicKey((1 << 100) + 1)  # Paillier: plaintext space 2^98
    steps.check_capacity(np.ones((64, 20)), small)  # fits
    with pytest.raises(OutOfRange, match="plaintext space"):
        steps.check_capacity(np.full((1000, 2), 2.0**29), small)


def test_capacity_refusal_carries_no_magnitude_of_the_data(monkeypatch):
    """The refusal reaches the peer: it names the limit, never how far this
    party's features would go."""
    monkeypatch.setattr(steps, "HIDDEN_VALUE_BITS", 80)
    key = PublicKey((1 << 1024) + 1)
    messages = set()
    for scale in (2.0**10, 2.0**20, 2.0**29):
        with pytest.raises(OutOfRange) as refused:
            steps.check_capacity(np.full((64, 3), scale), key)
        messages.add(str(refused.value))
    assert len(messages) == 1, messages


def test_target_fingerprint_is_ordered(keys):
    sk_a, sk_b = keys
    assert target_fingerprint(sk_a.public, sk_b.public) != target_fingerprint(sk_b.public, sk_a.public)


def test_batch_guard_and_merge():
    with pytest.raises(InvalidArgument, match="batch_size"):
        check_batch_size(59, 10, 20, allow_small=False)
    check_batch_size(60, 10, 20, allow_small=False)
    with pytest.raises(InvalidArgument):
        check_batch_size(20, 10, 20, allow_small=True)
    # The floor covers two decryptions per iteration (one restart) of
    # p_A + 1 equations each, plus the loss, for either side.
    assert min_batch_size(10, 20, allow_small=True) == 2 * 21
    assert min_batch_size(30, 5, allow_small=True) == 2 * 32
    assert min_batch_size(30, 5, allow_small=False) == 90
    assert min_batch_size(1, 1, allow_small=False) == 2 * 3
    with pytest.raises(InvalidArgument):
        check_batch_size(41, 10, 20, allow_small=True)
    check_batch_size(42, 10, 20, allow_small=True)
    sched = batch_schedule(455, 64, 2, seed=1, min_batch=60)
    sizes = [len(b.rows) for b in sched]
    assert sizes == [64] * 6 + [71] + [64] * 6 + [71]
    for epoch in (0, 1):
        rows = np.concatenate([b.rows for b in sched if b.epoch == epoch])
        assert sorted(rows.tolist()) == list(range(455))
    # Computed when asked for: 100,000 epochs cost one epoch's order, and a
    # limit (max_iterations) cuts the schedule without expanding it.
    many = batch_schedule(455, 64, 100_000, seed=1, min_batch=60)
    assert len(many) == 700_000 and len(many[-1].rows) == 71 and many[-1].epoch == 99_999
    assert len(batch_schedule(455, 64, 100_000, seed=1, min_batch=60, limit=3)) == 3
    np.testing.assert_array_equal(many[8].rows, sched[8].rows)  # same seed, same batches


def test_backend_vector_operations_are_exact(backend, keys):
    """encrypt/add/matvec/decrypt/rerandomise on signed integers, against Python ints."""
    sk, _ = keys
    n, pm = sk.public.n, sk.plaintext_modulus
    rng = np.random.default_rng(1)
    v = [int(x) for x in rng.integers(-(2**40), 2**40, size=6)]
    m = rng.integers(-(2**20), 2**20, size=(3, 6)).astype(object)
    enc = backend.encrypt(sk.public, [x % n for x in v])
    prod = backend.matvec(m, enc)
    got = [x - pm if x > pm // 2 else x for x in backend.decrypt(sk, prod)]
    assert got == [sum(int(m[i, j]) * v[j] for j in range(6)) for i in range(3)]
    twice = backend.add(enc, enc)
    assert [x - pm if x > pm // 2 else x for x in backend.decrypt(sk, twice)] == [2 * x for x in v]
    fresh = backend.rerandomise(enc)
    assert set(fresh.values).isdisjoint(enc.values)
    assert backend.decrypt(sk, fresh) == backend.decrypt(sk, enc)
