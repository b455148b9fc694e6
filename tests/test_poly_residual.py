"""The degree-5 polynomial residual (issue [4/6] item 5), its pure parts:
the fit, the split of P(u_A + u_B) into own and cross terms, element-wise
ciphertext-by-plaintext products, and step 0 with real keys in one process
(shares that sum to P(u) - y, a cross term A cannot read, A's range check).
Through the services: tests/test_poly5_service.py (docs/POLY5.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.reference_run import ReferenceRun
from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import CipherVector
from vfl.common.crypto.fixedpoint import RESIDUAL_SCALE_BITS, signed
from vfl.common.errors import OutOfRange
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol import steps
from vfl.common.protocol.optimizers import OptimizerSettings
from vfl.common.protocol.reference import train_plain, with_intercept
from vfl.common.protocol.residual import POLY5, sigmoid, sigmoid_fit

KEY_BITS = 1024  # the masked cross term needs ~170 plaintext bits: OU's 512-bit test keys have 168
BACKENDS = {"ou": get_backend("ou"), "paillier": get_backend("paillier")}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def keys(request):
    backend = BACKENDS[request.param]
    return backend, backend.generate_keypair(KEY_BITS)


def test_fit_is_odd_and_close_to_the_sigmoid():
    c = POLY5.coefficients
    assert c[0] == 0.5 and c[2] == c[4] == 0.0 and c[1] > 0 > c[3] and c[5] > 0
    u = np.linspace(-8, 8, 4001)
    assert np.max(np.abs(POLY5.value(u) - sigmoid(u))) < 0.065
    # Least squares: nudging any odd coefficient makes the squared error worse.
    grid = np.linspace(-8, 8, 20_001)  # the fit's own grid
    base = np.sum((POLY5.value(grid) - sigmoid(grid)) ** 2)
    for k in (1, 3, 5):
        for eps in (1e-3, -1e-3):
            nudged = list(c)
            nudged[k] *= 1 + eps
            assert np.sum((np.polynomial.polynomial.polyval(grid, nudged) - sigmoid(grid)) ** 2) > base
    # The Taylor line is far worse over the same range.
    assert np.max(np.abs(u / 4 + 0.5 - sigmoid(u))) > 1.0
    assert sigmoid_fit(3, 8.0)[3] < 0


def test_own_and_cross_terms_sum_to_the_polynomial():
    rng = np.random.default_rng(5)
    u_a, u_b = rng.normal(0, 3, 200), rng.normal(0, 3, 200)
    split = POLY5.coefficients[0] + POLY5.own(u_a) + POLY5.own(u_b) + POLY5.cross(u_a, u_b)
    np.testing.assert_allclose(split, POLY5.value(u_a + u_b), rtol=0, atol=1e-12)
    assert POLY5.cross_weights(u_b).shape == (4, 200)


def test_multiply_is_exact_for_signed_scalars(keys):
    backend, sk = keys
    n = sk.public.n
    values = [5, -7, 0, 123456789, -(2**40)]
    scalars = [3, -2, 99, -(2**30), 2**20]
    enc = backend.encrypt(sk.public, [v % n for v in values])
    got = signed(backend.decrypt(sk, backend.multiply(enc, scalars)), sk.plaintext_modulus)
    assert got == [v * k for v, k in zip(values, scalars, strict=True)]


def step0(backend, sk, u_a, u_b, y):
    powers = steps.encrypted_score_powers(backend, sk.public, u_a, POLY5)
    masked = steps.masked_cross_terms(backend, powers, u_b, POLY5)
    a = steps.active_poly_share(backend, sk, masked.ciphers, u_a, y, POLY5)
    b = steps.passive_poly_share(u_b, masked.mask, POLY5)
    return masked, a, b


def test_step0_shares_sum_to_the_polynomial_residual(keys):
    backend, sk = keys
    rng = np.random.default_rng(7)
    u_a, u_b = rng.normal(0, 3, 64), rng.normal(0, 3, 64)
    y = (rng.random(64) < 0.5).astype(float)
    _, a, b = step0(backend, sk, u_a, u_b, y)
    want = (POLY5.value(u_a + u_b) - y) * 2.0**RESIDUAL_SCALE_BITS
    got = np.array([x + z for x, z in zip(a, b, strict=True)], dtype=np.float64)
    # The fixed-point rounding of the powers and weights (under 1e-6), not the masks.
    assert np.max(np.abs(got - want)) / 2.0**RESIDUAL_SCALE_BITS < 1e-6
    assert min(abs(v) for v in a) > 2**60  # each share alone is masked


def cross_readable(values: list[int], cross: np.ndarray) -> bool:
    """A's best linear guess of the cross terms from what it decrypted."""
    v = np.array([float(x) for x in values])
    return abs(float(np.corrcoef(v, cross)[0, 1])) > 0.3


def test_a_cannot_read_the_cross_term(keys, monkeypatch):
    """What A decrypts is cross + s with s uniform over 80 more bits than
    any cross term: uncorrelated with the cross terms B's scores give. With
    the mask planted to zero the same attack reads them exactly."""
    backend, sk = keys
    rng = np.random.default_rng(11)
    u_a, u_b = rng.normal(0, 3, 300), rng.normal(0, 3, 300)
    cross = POLY5.cross(u_a, u_b)
    masked, _, _ = step0(backend, sk, u_a, u_b, np.zeros(300))
    seen = signed(backend.decrypt(sk, masked.ciphers), sk.plaintext_modulus)
    assert not cross_readable(seen, cross)
    monkeypatch.setattr(steps.secrets, "randbits", lambda bits: 0)  # the planted bug: no mask
    masked, _, _ = step0(backend, sk, u_a, u_b, np.zeros(300))
    assert cross_readable(signed(backend.decrypt(sk, masked.ciphers), sk.plaintext_modulus), cross)


def test_a_refuses_a_crafted_cross_term_and_out_of_range_scores(keys):
    backend, sk = keys
    big = 1 << (steps.cross_term_bits(POLY5) + 90)
    crafted = backend.encrypt(sk.public, [big, sk.public.n - big], hiding=True)
    with pytest.raises(OutOfRange, match=r"^\[\[cross \+ s\]\]_A: a decrypted value is outside"):
        steps.active_poly_share(backend, sk, crafted, np.zeros(2), np.zeros(2), POLY5)
    with pytest.raises(OutOfRange, match="^u_A: a score beyond"):
        steps.encrypted_score_powers(backend, sk.public, np.array([0.0, 65.0]), POLY5)
    powers = steps.encrypted_score_powers(backend, sk.public, np.zeros(2), POLY5)
    with pytest.raises(OutOfRange, match="^u_B: a score beyond"):
        steps.masked_cross_terms(backend, powers, np.array([-70.0, 0.0]), POLY5)
    assert len(CipherVector(sk.public, powers.values)) == 8


def test_plain_poly5_training_reaches_scikit_learn_auc_on_breast():
    """The plain run of the polynomial residual (what the federated one must
    match) on the bundled split: AUC within 0.005 of scikit-learn's."""
    from sklearn.linear_model import LogisticRegression

    from tests.conftest import BUNDLED_ACTIVE, split_ids

    train, test, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    ref = ReferenceRun(JobConfig(), train)
    rng = np.random.default_rng(0)
    w_a, w_b = train_plain(
        ref.x_active,
        ref.x_passive,
        ref.y,
        rng.normal(0, 0.01, ref.x_active.shape[1] + 1),
        rng.normal(0, 0.01, ref.x_passive.shape[1]),
        ref.batches,
        OptimizerSettings(learning_rate=0.15),
        0.01,
        model=POLY5,
    )
    xa = with_intercept(ref.scaler_a.transform(ref.active.features[ref.active.positions(test, "ids")]))
    xb = ref.scaler_b.transform(ref.passive.features[ref.passive.positions(test, "ids")])
    y = ref.active.labels[ref.active.positions(test, "ids")]
    joined = np.hstack([with_intercept(ref.x_active), ref.x_passive])
    sk = LogisticRegression(C=100.0, max_iter=5000).fit(joined, ref.y)
    auc_sk = roc_auc_score(y, sk.decision_function(np.hstack([xa, xb])))
    auc_poly = roc_auc_score(y, xa @ w_a + xb @ w_b)
    print(f"breast AUC: poly5 {auc_poly:.4f}, scikit-learn {auc_sk:.4f}")
    assert math.isfinite(auc_poly) and auc_poly > auc_sk - 0.005, (auc_poly, auc_sk)
