"""One function per step of PROTOCOL.md ("One training iteration",
"Loss for convergence checks", "Prediction").

Pure: numpy arrays and ciphertext vectors in and out, no gRPC. Both parties
call the same functions for the symmetric steps; the docstrings say who calls
what. Notation: for A, X is [X_A, 1] (the intercept is a column of ones) and
the share is a = u_A/4 + 1/2 - y; for B, X is X_B and the share is b = u_B/4
(the Taylor residual of logistic regression; linear regression's shares,
a = u_A - y and b = u_B, come from the job's ResidualModel in residual.py).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vfl.common import dp
from vfl.common.crypto.backend import (
    MASK_STATISTICAL_BITS,
    CipherVector,
    HEBackend,
    PrivateKey,
    PublicKey,
    check_masked_plaintexts,
    random_mask,
    unmask,
)
from vfl.common.crypto.fixedpoint import (
    FEATURE_SCALE_BITS,
    RESIDUAL_SCALE_BITS,
    encode,
    signed,
    to_fixed,
)
from vfl.common.errors import OutOfRange
from vfl.common.protocol.optimizers import OptimizerSettings, OptimizerState, initial_state, optimizer_update
from vfl.common.protocol.residual import LOGISTIC, PolynomialResidual, ResidualModel, sigmoid

__all__ = ["sigmoid"]  # re-exported: callers score with steps.sigmoid

AnyResidual = ResidualModel | PolynomialResidual

# Largest |value| of a residual share, score or standardised feature that the
# fixed-point encoding accepts; it bounds every homomorphic sum below.
SHARE_BOUND = float(2**20)
FEATURE_BOUND = float(2**30)
# Every value hidden by a mask (the cross gradient X^T s at scale 2^48) is
# below 2^HIDDEN_VALUE_BITS in magnitude: checked by the party that masks it,
# and, where the plaintext modulus is secret (OU), by the party that decrypts.
HIDDEN_VALUE_BITS = 128


# --- initial weights (each party, before the first iteration) --------------


def private_initial_weights(length: int, scale: float) -> np.ndarray:
    """Small random initial weights from this party's own CSPRNG. Zero
    weights would let B learn X_B^T (1/2 - y) in the first iteration; weights
    a peer could compute (from the job seed, say) would let A read X_B off
    prediction's u_B = X_B w_B. Nothing a peer sends determines them."""
    rng = np.random.default_rng(secrets.randbits(128))
    return rng.normal(0.0, scale, size=length)


def reproducible_initial_weights(seed: int, job_id: str, length: int, scale: float) -> np.ndarray:
    """Tests only (a party's own VFL_TEST_INITIAL_WEIGHTS_SEED, in test mode):
    reproducible initial weights, so that two runs of a job compare bit for bit."""
    tag = int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big")
    return np.random.default_rng([seed, tag]).normal(0.0, scale, size=length)


def initial_weights(test_seed: int | None, job_id: str, length: int, scale: float) -> np.ndarray:
    """A party's initial weights for a job: private, unless its own test-mode
    seed asks for reproducible ones."""
    if test_seed is not None:
        return reproducible_initial_weights(test_seed, job_id, length, scale)
    return private_initial_weights(length, scale)


# --- plaintext shares (each party, on its own data) -------------------------


def with_intercept(x: np.ndarray) -> np.ndarray:
    """[X, 1]: A's rows with the intercept as a column of ones (last)."""
    return np.hstack([x, np.ones((x.shape[0], 1))])


def active_residual_share(
    x_active: np.ndarray, w_active: np.ndarray, y: np.ndarray, model: ResidualModel = LOGISTIC
) -> np.ndarray:
    """A's part of the residual (intercept in w_active): a = u_A/4 + 1/2 - y
    for the Taylor residual, u_A - y for linear regression."""
    return model.active_share(x_active @ w_active, y)


def passive_residual_share(x_passive: np.ndarray, w_passive: np.ndarray, model: ResidualModel = LOGISTIC) -> np.ndarray:
    """B's part of the residual: b = u_B/4 (Taylor), u_B (linear)."""
    return model.passive_share(x_passive @ w_passive)


def encrypt_share(backend: HEBackend, key: PublicKey, share: np.ndarray, hiding: bool = False) -> CipherVector:
    return backend.encrypt(key, encode(share, RESIDUAL_SCALE_BITS, key.n, SHARE_BOUND), hiding=hiding)


# --- steps 1-2 ---------------------------------------------------------------


def first_encrypted_data(backend: HEBackend, key_active: PublicKey, a: np.ndarray) -> CipherVector:
    """Step 1 (A): [[a_S]]_A, A's parameters, features and labels under T."""
    return encrypt_share(backend, key_active, a)


def first_intermediate_share(backend: HEBackend, key_passive: PublicKey, b: np.ndarray) -> CipherVector:
    """Step 2 (B): [[b_S]]_B, B's share of <<d_S>> = ([[a_S]]_A, [[b_S]]_B)."""
    return encrypt_share(backend, key_passive, b)


# --- step 0, with the polynomial residual (docs/POLY5.md) ------------------
#
# Before steps 1-2, the parties turn P(u_A + u_B) - y into additive shares:
# A sends [[u_A^i]]_A (i < degree), B returns the cross term under pk_A with
# a fresh mask s of its own, A decrypts cross + s. A's share is then
# c_0 + own(u_A) - y + cross + s, B's own(u_B) - s; steps 1-5 carry them as
# any other shares. Integers at scale 2^RESIDUAL_SCALE_BITS throughout: the
# masked shares are large, and float64 would lose what the masks cancel.

# Largest |u_A|, |u_B| the polynomial step accepts (the fit is over [-8, 8];
# beyond 64 a score means a diverged model, and the bound keeps every value
# inside the masks' range).
POLY_SCORE_BOUND = 64.0
CROSS_SCALE_BITS = 2 * RESIDUAL_SCALE_BITS


def cross_term_bits(model: PolynomialResidual) -> int:
    """Bits of |cross| at scale 2^CROSS_SCALE_BITS for scores within the bound."""
    c, k, v = model.coefficients, model.degree, POLY_SCORE_BOUND
    bound = sum(abs(c[j]) * math.comb(j, i) * v**j for j in range(2, k + 1) for i in range(1, j))
    return math.ceil(math.log2(bound + 1)) + CROSS_SCALE_BITS + 1


def encrypted_score_powers(
    backend: HEBackend, key_active: PublicKey, u_active: np.ndarray, model: PolynomialResidual
) -> CipherVector:
    """Step 0 (A): [[u_A^i]]_A for i = 1..degree-1, one block of m per power."""
    if u_active.size and float(np.max(np.abs(u_active))) > POLY_SCORE_BOUND:
        raise OutOfRange(f"u_A: a score beyond +-{POLY_SCORE_BOUND:g}, outside the polynomial residual's range")
    powers = np.concatenate([u_active**i for i in range(1, model.degree)])
    bound = POLY_SCORE_BOUND ** (model.degree - 1)
    return backend.encrypt(key_active, encode(powers, RESIDUAL_SCALE_BITS, key_active.n, bound))


@dataclass(frozen=True)
class MaskedCross:
    """[[cross + s]]_A, and s (at scale 2^CROSS_SCALE_BITS), which never leaves B."""

    ciphers: CipherVector
    mask: tuple[int, ...]


def masked_cross_terms(
    backend: HEBackend, powers: CipherVector, u_passive: np.ndarray, model: PolynomialResidual
) -> MaskedCross:
    """Step 0 (B): [[sum_i u_A^i q_i(u_B) + s]]_A per sample, s uniform over
    2^(cross bits + MASK_STATISTICAL_BITS) (statistical hiding, either
    scheme), added as a fresh hiding encryption (it re-randomises the sum)."""
    m = len(u_passive)
    powers.require_length((model.degree - 1) * m, "[[u_A^i]]_A")
    if u_passive.size and float(np.max(np.abs(u_passive))) > POLY_SCORE_BOUND:
        raise OutOfRange(f"u_B: a score beyond +-{POLY_SCORE_BOUND:g}, outside the polynomial residual's range")
    key = powers.key
    bits = cross_term_bits(model)
    if bits + MASK_STATISTICAL_BITS + 2 > key.plaintext_bits:
        raise OutOfRange(f"cross term: the masked value does not fit the {key.bits}-bit key's plaintext space")
    weights = to_fixed(model.cross_weights(u_passive), RESIDUAL_SCALE_BITS, float(2**60))
    acc: CipherVector | None = None
    for i in range(model.degree - 1):
        block = CipherVector(key, powers.values[i * m : (i + 1) * m])
        term = backend.multiply(block, [int(v) for v in weights[i]])
        acc = term if acc is None else backend.add(acc, term)
    mask = tuple(secrets.randbits(bits + MASK_STATISTICAL_BITS) for _ in range(m))
    fresh = backend.encrypt(key, [v % key.n for v in mask], hiding=True)
    assert acc is not None
    return MaskedCross(backend.add(acc, fresh), mask)


def active_poly_share(
    backend: HEBackend,
    key: PrivateKey,
    masked: CipherVector,
    u_active: np.ndarray,
    y: np.ndarray,
    model: PolynomialResidual,
) -> list[int]:
    """Step 0 (A): its share c_0 + own(u_A) - y + cross + s, as integers at
    scale 2^RESIDUAL_SCALE_BITS. The decryption is range-checked first (with
    OU, a crafted value past p/2 would be a sign oracle on A's secret p)."""
    masked.require_key(key.public, "[[cross + s]]_A")
    masked.require_length(len(y), "[[cross + s]]_A")
    bits = cross_term_bits(model)
    low, high = -(1 << bits), 1 << (bits + MASK_STATISTICAL_BITS + 1)
    values = signed(backend.decrypt(key, masked), key.plaintext_modulus)
    if any(not low <= v < high for v in values):
        raise OutOfRange("[[cross + s]]_A: a decrypted value is outside the range a masked cross term allows")
    own = to_fixed(model.coefficients[0] + model.own(u_active) - y, RESIDUAL_SCALE_BITS, SHARE_BOUND)
    shift = CROSS_SCALE_BITS - RESIDUAL_SCALE_BITS
    return [int(o) + (v >> shift) for o, v in zip(own, values, strict=True)]


def passive_poly_share(u_passive: np.ndarray, mask: tuple[int, ...], model: PolynomialResidual) -> list[int]:
    """Step 0 (B): its share own(u_B) - s at scale 2^RESIDUAL_SCALE_BITS.
    Both parties floor at the same place, so the shares sum to
    P(u) - y to within one unit of the last place."""
    own = to_fixed(model.own(u_passive), RESIDUAL_SCALE_BITS, SHARE_BOUND)
    shift = CROSS_SCALE_BITS - RESIDUAL_SCALE_BITS
    return [int(o) - (s >> shift) for o, s in zip(own, mask, strict=True)]


# --- step 3 ------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedGradient:
    """[[X^T s + R]] under the peer's key, and R, which never leaves its owner."""

    ciphers: CipherVector
    mask: tuple[int, ...]


def fixed_transpose(x: np.ndarray) -> np.ndarray:
    """X^T as signed integers at the feature scale, computed once per batch."""
    return to_fixed(x.T, FEATURE_SCALE_BITS, FEATURE_BOUND)


def cross_gradient_bound(x: np.ndarray, model: AnyResidual = LOGISTIC) -> float:
    """Largest |(X^T s)_j| any valid peer share s can give (real units)."""
    if x.size == 0:
        return 0.0
    return float(np.max(np.sum(np.abs(x), axis=0))) * share_bound(model)


def check_capacity(x: np.ndarray, key: PublicKey, model: AnyResidual = LOGISTIC) -> None:
    """Refuse a product that could wrap around instead of returning a wrong number."""
    hidden = hidden_value_bits(model)
    if key.masked_value_bits(hidden) > key.plaintext_bits:
        raise OutOfRange(f"batch: a masked gradient does not fit the plaintext space of the {key.bits}-bit key")
    bound = cross_gradient_bound(x, model) * 2.0 ** (FEATURE_SCALE_BITS + RESIDUAL_SCALE_BITS)
    limit = min(hidden, key.plaintext_bits)
    if bound > 0 and math.log2(bound) + 1 >= limit:
        # The message reaches the peer: it names the limit, never how far the
        # data would go (that is a magnitude of this party's features).
        raise OutOfRange(
            f"batch: X^T s could exceed the 2^{limit} that the {key.bits}-bit key's plaintext space and the "
            "masking allow; use smaller batches or features"
        )


def masked_encrypted_gradient(
    backend: HEBackend, x: np.ndarray, peer_share: CipherVector, model: AnyResidual = LOGISTIC
) -> MaskedGradient:
    """Step 3 (both): [[X^T s_peer + R]]_peer for the batch's rows x. R is added
    as a fresh encryption, never as a plaintext shift: the peer reads a
    ciphertext's randomness on decryption, and that of X^T [[s]] alone would
    reveal X; the fresh encryption's randomness is uniform over the whole
    randomness group (hiding=True), which hides it whatever the peer chose."""
    check_capacity(x, peer_share.key, model)
    fixed = fixed_transpose(x)
    product = backend.matvec(fixed, peer_share)
    mask = random_mask(peer_share.key, len(product), hidden_value_bits(model))
    fresh = backend.encrypt(peer_share.key, mask, hiding=True)
    return MaskedGradient(backend.add(product, fresh), mask)


# --- step 4 ------------------------------------------------------------------


def decrypt_masked_gradient(
    backend: HEBackend, key: PrivateKey, ciphers: CipherVector, expected_length: int, model: AnyResidual = LOGISTIC
) -> list[int]:
    """Step 4 (both): decrypt the peer's masked gradient, z = h + R mod n.
    Only a vector of the expected length under this party's own key (each
    ciphertext was range-checked where serde decoded it), and only values a
    masked gradient can be."""
    ciphers.require_key(key.public, "masked gradient")
    ciphers.require_length(expected_length, "masked gradient")
    z = backend.decrypt(key, ciphers)
    check_masked_plaintexts(key, z, hidden_value_bits(model), "masked gradient")
    return z


def add_release_noise(key: PrivateKey, z: list[int], noise: np.ndarray) -> list[int]:
    """Step 4, with differential privacy (the decrypting party): the noise,
    in real units of the cross gradient, added to the masked values it
    returns, so that the owner's unmasked gradient carries it. Paillier:
    mod n. OU: z is the integer h + R with R >= 2^HIDDEN_VALUE_BITS, far
    above any noise, so the sum stays a valid masked value."""
    if len(noise) != len(z):
        raise OutOfRange(f"noise: expected {len(z)} values, got {len(noise)}")
    fixed = dp.noise_to_fixed(noise, FEATURE_SCALE_BITS + RESIDUAL_SCALE_BITS)
    if key.public.mask_modulus_public:
        n = key.public.n
        return [(v + e) % n for v, e in zip(z, fixed, strict=True)]
    return [v + e for v, e in zip(z, fixed, strict=True)]


# Noise beyond this many standard deviations is refused as out of range: the
# chance that an honest Gaussian draw reaches it is below 1e-80.
NOISE_RANGE_STDS = 20.0


# --- step 5 ------------------------------------------------------------------


def unmask_gradient(
    z: list[int], mask: tuple[int, ...], key: PublicKey, bound: float, noise_std: float = 0.0
) -> np.ndarray:
    """Step 5a (both): "decrypt with the random vector": h = z - R, then
    decode; a value beyond what any valid share (plus the peer's calibrated
    noise, under differential privacy) allows is refused."""
    bound += NOISE_RANGE_STDS * noise_std
    if len(z) != len(mask):
        raise OutOfRange(f"decrypted gradient: expected {len(mask)} values, got {len(z)}")
    denom = float(1 << (FEATURE_SCALE_BITS + RESIDUAL_SCALE_BITS))
    h = np.array([v / denom for v in unmask(key, z, mask)], dtype=np.float64)
    if h.size and float(np.max(np.abs(h))) > bound * (1 + 1e-9) + 1.0:
        raise OutOfRange("decrypted gradient: a value is outside the range a valid share allows")
    return h


def gradient_from_shares(
    x: np.ndarray, own_share: np.ndarray, cross: np.ndarray, w: np.ndarray, l2: float, penalised: np.ndarray
) -> np.ndarray:
    """Step 5b (both): (X^T own_share + X^T peer_share) / m + l2 * w on the
    penalised coordinates (the intercept is not penalised)."""
    m = x.shape[0]
    return np.asarray((x.T @ own_share + cross) / m + l2 * w * penalised, dtype=np.float64)


@dataclass(frozen=True)
class Decryption:
    """What a key owner returned for one of this party's masked gradients:
    z = X^T s_owner + R mod n_owner, the mask R this party added, and the
    owner's key (whose plaintext modulus R is removed in)."""

    z: list[int]
    mask: tuple[int, ...]
    key: PublicKey


def update_own_weights(
    received: Sequence[Decryption],
    x: np.ndarray,
    own_share: np.ndarray,
    w: np.ndarray,
    *,
    penalised: np.ndarray,
    l2: float,
    noise_std: float,
    optimizer: OptimizerSettings,
    state: OptimizerState | None,
) -> tuple[np.ndarray, OptimizerState]:
    """Step 5 (every party): remove this party's mask from each key owner's
    decryption of its masked gradient (one with one peer, k with k), add
    X^T own_share, divide by m, add the L2 term, and update w with this
    party's own optimiser (state None: its first update)."""
    bound = cross_gradient_bound(x)
    cross = np.zeros(len(w))
    for d in received:
        cross = cross + unmask_gradient(d.z, d.mask, d.key, bound, noise_std)
    gradient = gradient_from_shares(x, own_share, cross, w, l2, penalised)
    return optimizer_update(optimizer, w, gradient, initial_state(optimizer, len(w)) if state is None else state)


# --- steps 1-5 on the polynomial shares (docs/POLY5.md) ---------------------
#
# After step 0 each share is an integer at scale 2^RESIDUAL_SCALE_BITS of
# about poly_share_bits bits (B's mask dominates): it is encrypted as it is
# (never through float64), the masked gradients hide values of
# hidden_value_bits(model) bits, and step 5 adds X^T own_share and the
# unmasked cross gradient as exact integers before the one division to float.

# Largest column sum of |x| over a batch (2^32: a batch of 2^16 rows of
# standardised features up to 2^16) the polynomial masked gradient allows.
POLY_COLUMN_SUM_BITS = 32


def poly_share_bits(model: PolynomialResidual) -> int:
    """Bits of |a|, |b| after step 0 at scale 2^RESIDUAL_SCALE_BITS: the
    masked cross term shifted down, plus an own term below 2^52."""
    return cross_term_bits(model) + MASK_STATISTICAL_BITS + 2 - (CROSS_SCALE_BITS - RESIDUAL_SCALE_BITS)


def share_bound(model: AnyResidual) -> float:
    """Largest |share| in real units: SHARE_BOUND, or the masked polynomial share's."""
    if isinstance(model, PolynomialResidual):
        return float(2 ** (poly_share_bits(model) - RESIDUAL_SCALE_BITS))
    return SHARE_BOUND


def hidden_value_bits(model: AnyResidual) -> int:
    """Bits of the value a masked gradient hides: HIDDEN_VALUE_BITS for the
    Taylor and linear residuals; for the polynomial one, X^T s of a share of
    poly_share_bits at the feature scale over column sums up to 2^POLY_COLUMN_SUM_BITS."""
    if isinstance(model, PolynomialResidual):
        return poly_share_bits(model) + FEATURE_SCALE_BITS + POLY_COLUMN_SUM_BITS
    return HIDDEN_VALUE_BITS


def poly_key_bits(model: PolynomialResidual) -> int:
    """Plaintext bits a key needs for the polynomial residual: a masked
    gradient (the largest masked value; the masked cross term is smaller)."""
    return max(hidden_value_bits(model), cross_term_bits(model)) + MASK_STATISTICAL_BITS + 2


def check_poly_key(key: PublicKey, model: PolynomialResidual, whose: str) -> None:
    """Refuse, before any iteration, a key too small for the polynomial residual."""
    need = poly_key_bits(model)
    if key.plaintext_bits < need:
        raise OutOfRange(
            f"residual {model.name}: the {key.bits}-bit key of {whose} has {key.plaintext_bits} plaintext bits, "
            f"its masked gradients need {need}; use larger keys (OU: 1024 bits or more)"
        )


def encrypt_integer_share(
    backend: HEBackend, key: PublicKey, share: Sequence[int], model: PolynomialResidual
) -> CipherVector:
    """Steps 1-2 (both), polynomial residual: [[s]] of the integer share from
    step 0, exactly (no float64 on the way)."""
    limit = 1 << poly_share_bits(model)
    if any(abs(v) >= limit for v in share):
        raise OutOfRange(f"share: a value beyond the {poly_share_bits(model)} bits a polynomial share can have")
    return backend.encrypt(key, [int(v) % key.n for v in share])


def update_own_weights_exact(
    received: Sequence[Decryption],
    x: np.ndarray,
    own_share: Sequence[int],
    w: np.ndarray,
    *,
    penalised: np.ndarray,
    l2: float,
    optimizer: OptimizerSettings,
    state: OptimizerState | None,
    model: PolynomialResidual,
) -> tuple[np.ndarray, OptimizerState]:
    """Step 5 (every party), polynomial residual: X^T own_share (the same
    fixed-point X^T as the peer's product, at scale 2^(FEATURE + RESIDUAL))
    plus each unmasked cross gradient, summed as exact integers: the two
    terms are ~2^100 in real units and cancel to the gradient, which float64
    would lose. One division to float at the end."""
    fixed = fixed_transpose(x)
    own = np.array([int(v) for v in own_share], dtype=object)
    total = [int(v) for v in fixed.dot(own)] if len(own) else [0] * len(w)
    col = [sum(abs(int(v)) for v in row) for row in fixed]
    limit = 1 << poly_share_bits(model)
    for d in received:
        h = unmask(d.key, d.z, d.mask)
        if len(h) != len(total):
            raise OutOfRange(f"decrypted gradient: expected {len(total)} values, got {len(h)}")
        if any(abs(v) > c * limit for v, c in zip(h, col, strict=True)):
            raise OutOfRange("decrypted gradient: a value is outside the range a valid share allows")
        total = [t + v for t, v in zip(total, h, strict=True)]
    m = x.shape[0]
    denom = 1 << (FEATURE_SCALE_BITS + RESIDUAL_SCALE_BITS)
    sums = np.array([v / denom for v in total], dtype=np.float64)  # int / int: correctly rounded
    gradient = np.asarray(sums / m + l2 * w * penalised, dtype=np.float64)
    return optimizer_update(optimizer, w, gradient, initial_state(optimizer, len(w)) if state is None else state)


# --- loss check --------------------------------------------------------------

LOSS_SCALE_BITS = 2 * RESIDUAL_SCALE_BITS


def passive_loss_share(
    backend: HEBackend, a_enc: CipherVector, u_passive: np.ndarray, model: ResidualModel = LOGISTIC
) -> CipherVector:
    """B: [[sum_i a_i u_B,i + c sum_i u_B,i^2]]_A (c = 1/8 Taylor, 1/2 linear),
    at scale 2^LOSS_SCALE_BITS.
    The fresh hiding encryption re-randomises the result (it hides the
    randomness of the product, as in step 3)."""
    key = a_enc.key
    u_fixed = to_fixed(u_passive.reshape(1, -1), RESIDUAL_SCALE_BITS, SHARE_BOUND)
    cross = backend.matvec(u_fixed, a_enc)
    own = encode(np.array([float(np.sum(u_passive**2)) * model.loss_square]), LOSS_SCALE_BITS, key.n, SHARE_BOUND**2)
    return backend.add(cross, backend.encrypt(key, own, hiding=True))


def loss_share_bound(m: int, model: ResidualModel = LOGISTIC) -> float:
    """Largest |sum_i a_i u_B,i + c sum_i u_B,i^2| over m rows of valid shares."""
    return m * SHARE_BOUND * SHARE_BOUND * (1.0 + model.loss_square)


# With k passive parties the loss has a cross term for every pair of them,
# sum_i u_j,i b_l,i (= u_j u_l / 4 Taylor, u_j u_l linear). B_j computes it
# under pk_l with a statistical mask r of its own, B_l decrypts s = cross + r
# and adds s to its loss share under pk_A, B_j subtracts r from its own: A
# decrypts the sum of the shares, the loss's one scalar, and nobody else sees
# a cross term unmasked. The mask is statistical (never uniform mod n), so
# that s is the exact integer cross + r and moves from pk_l to pk_A intact.


def pair_loss_bits(m: int) -> int:
    """Bits of the largest |sum_i u_j,i b_l,i| over m rows of valid shares, at 2^LOSS_SCALE_BITS."""
    return math.ceil(math.log2(m * SHARE_BOUND * SHARE_BOUND) + LOSS_SCALE_BITS) + 1


def pair_loss_term(backend: HEBackend, u_own: np.ndarray, peer_share: CipherVector) -> tuple[CipherVector, int]:
    """B_j: [[sum_i u_j,i b_l,i + r]]_l and r, from B_l's relayed [[b_l]]_l."""
    key = peer_share.key
    bits = pair_loss_bits(len(u_own))
    if bits + MASK_STATISTICAL_BITS + 2 > key.plaintext_bits:
        raise OutOfRange(f"loss: a masked cross term does not fit the {key.bits}-bit key of a passive party")
    u_fixed = to_fixed(u_own.reshape(1, -1), RESIDUAL_SCALE_BITS, SHARE_BOUND)
    mask = (1 << bits) + secrets.randbits(bits + MASK_STATISTICAL_BITS)
    product = backend.matvec(u_fixed, peer_share)
    return backend.add(product, backend.encrypt(key, [mask], hiding=True)), mask


def decrypt_pair_loss_term(backend: HEBackend, key: PrivateKey, term: CipherVector, m: int) -> int:
    """B_l: s = cross + r, refused unless a masked cross term can be that (a
    crafted ciphertext must not probe the residues of B_l's key)."""
    term.require_key(key.public, "loss cross term")
    term.require_length(1, "loss cross term")
    s = backend.decrypt(key, term)[0]
    if not 0 < s < 1 << (pair_loss_bits(m) + MASK_STATISTICAL_BITS + 2):
        raise OutOfRange("loss cross term: the decrypted value is outside the range a masked term allows")
    return int(s)


def passive_loss_share_adjusted(
    backend: HEBackend, a_enc: CipherVector, u_passive: np.ndarray, adjustment: int, model: ResidualModel = LOGISTIC
) -> CipherVector:
    """B_j's loss share with k passive parties: passive_loss_share plus
    (the masked cross terms it decrypted) - (the masks it added), at 2^LOSS_SCALE_BITS."""
    share = passive_loss_share(backend, a_enc, u_passive, model)
    if adjustment == 0:
        return share
    key = a_enc.key
    if abs(adjustment) >= key.n // 4:
        raise OutOfRange("loss: the masks do not fit the active party's key")
    return backend.add(share, backend.encrypt(key, [adjustment % key.n], hiding=True))


def active_loss(
    u_active: np.ndarray,
    y: np.ndarray,
    share: CipherVector,
    backend: HEBackend,
    key: PrivateKey,
    model: ResidualModel = LOGISTIC,
    terms: int = 1,
) -> float:
    """A: the batch's loss from its own terms and B's decrypted share (with
    k passive parties: the sum of their shares, `terms` = k + k (k - 1) / 2
    bounded terms in all)."""
    share.require_key(key.public, "loss share")
    share.require_length(1, "loss share")
    m = len(y)
    raw = signed(backend.decrypt(key, share), key.plaintext_modulus)[0]
    # Range-checked before use: with OU, whether a crafted value decrypts
    # above or below p/2 would otherwise be a sign oracle on A's secret p.
    if abs(raw) > terms * loss_share_bound(m, model) * float(1 << LOSS_SCALE_BITS):
        raise OutOfRange("loss share: the decrypted value is outside the range a valid share allows")
    return model.active_loss(u_active, y, raw / float(1 << LOSS_SCALE_BITS))


# --- prediction --------------------------------------------------------------


def third_encrypted_data(backend: HEBackend, key_active: PublicKey, u_active: np.ndarray) -> CipherVector:
    """Prediction (A): [[u_A]]_A."""
    return encrypt_share(backend, key_active, u_active)


def target_prediction_data(backend: HEBackend, u_active_enc: CipherVector, u_passive: np.ndarray) -> CipherVector:
    """Prediction (B): [[u_A]]_A + [[u_B]]_A (the fourth encrypted data). The
    fresh hiding encryption of u_B re-randomises the sum, so A cannot link it
    to what it sent."""
    return backend.add(u_active_enc, encrypt_share(backend, u_active_enc.key, u_passive, hiding=True))


def decrypt_prediction(
    backend: HEBackend, key: PrivateKey, scores: CipherVector, expected_length: int, model: AnyResidual = LOGISTIC
) -> np.ndarray:
    """Prediction (A): decrypt u_A + u_B and apply the model's link (the
    sigmoid for logistic regression)."""
    scores.require_key(key.public, "prediction scores")
    scores.require_length(expected_length, "prediction scores")
    raw = signed(backend.decrypt(key, scores), key.plaintext_modulus)
    # u_A + u_B of valid shares; anything else is refused before use (with
    # OU, a sign oracle on A's secret p).
    limit = int(2 * SHARE_BOUND) << RESIDUAL_SCALE_BITS
    if any(abs(v) > limit for v in raw):
        raise OutOfRange("prediction scores: a decrypted score is outside the range valid shares allow")
    return model.link(np.array(raw, dtype=np.float64) / float(1 << RESIDUAL_SCALE_BITS))
