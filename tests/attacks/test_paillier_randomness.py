"""Attack: a curious key holder reads B's features from the randomness of
B's step-3 reply (issue "[1/6] Private in fact", item 3).

The adversary is A, playing the protocol over real gRPC against a real B
process (Paillier backend, 1024-bit test keys). It follows the protocol
honestly in everything except the choice of its own randomness: it picks a
Paillier key whose factor p is 1 mod 4, and encrypts its share [[a]]_A with
randomness r_i uniform in Z_n^* that it records. B's step-3 reply is
[[X_B^T a + R_B]]_A = prod_i [[a_i]]^(x_ij) * Enc(R_B)_j, so the randomness of
output j is prod_i r_i^(x_ij) times that of B's fresh encryption, and its
Legendre symbol mod p is

    (c_j | p) = (-1)^(sum_{i: (r_i | p) = -1} x_ij) * (fresh_j | p)

((1 + n)^m = 1 mod p, so the symbol of the ciphertext is that of its
randomness). If B's fresh randomness is always a square mod p (the old
h_s = (-x^2)^n, -1 being a square mod p = 1 mod 4), A reads the parity of a
subset sum of B's fixed-point features: one bit per output per iteration. A
hiding encryption (randomness r^n, r uniform in Z_n^*) makes (fresh_j | p)
a uniform sign and the guess a coin toss.

The same harness runs against B under the planted regression
"paillier-square-randomness" (tests/attacks/planted.py), where the attack must
succeed: that shows this test would catch the bug coming back.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import gmpy2
import numpy as np
from gmpy2 import mpz
from scipy.stats import binomtest

from tests.attacks.harness import MaliciousActive, attack_federation, passive_features
from tests.conftest import TEST_KEY_BITS, BreastSplit
from vfl.common.crypto.backend import CipherVector, PrivateKey, get_backend
from vfl.common.crypto.fast_backend import generate_paillier
from vfl.common.crypto.fixedpoint import RESIDUAL_SCALE_BITS, encode
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol import steps

ITERATIONS = 12  # 20 outputs each: 240 bits
PLANT = "paillier-square-randomness"


@dataclass
class AttackResult:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def pvalue(self) -> float:
        return float(binomtest(self.correct, self.total, 0.5).pvalue)


def _curious_key() -> tuple[PrivateKey, int]:
    """A's own choice: a Paillier key with a prime factor p = 1 mod 4."""
    while True:
        key = generate_paillier(TEST_KEY_BITS)
        for f in (key.p, key.q):
            if f % 4 == 1:
                return key, f


def _encrypt_with_uniform_randomness(key: PrivateKey, p: int, share: np.ndarray) -> tuple[CipherVector, np.ndarray]:
    """[[a]]_A as phe would encrypt it (r_i uniform in Z_n^*), and which r_i
    are non-squares mod p."""
    n, n2 = mpz(key.public.n), mpz(key.public.n_square)
    ciphers, non_square = [], []
    for m in encode(share, RESIDUAL_SCALE_BITS, key.public.n, steps.SHARE_BOUND):
        while True:
            r = mpz(secrets.randbelow(key.public.n))
            if gmpy2.gcd(r, n) == 1:
                break
        ciphers.append(int((1 + m * n) * gmpy2.powmod(r, n, n2) % n2))
        non_square.append(gmpy2.legendre(r % p, p) == -1)
    return CipherVector(key.public, tuple(ciphers)), np.array(non_square)


def run_attack(workdir: Path, breast: BreastSplit, plants: dict[str, str]) -> AttackResult:
    fed = attack_federation(workdir, plants, backend="paillier")
    key, p = _curious_key()
    ids = breast.train_ids
    x_b = passive_features(ids)
    config = JobConfig(batch_size=64, epochs=2, seed=20261126, loss_every=0, max_iterations=ITERATIONS)
    correct = total = 0
    try:
        fed.start("passive")
        a = MaliciousActive(fed.services["passive"].address, key, get_backend("paillier"), ids)
        a.exchange_keys()
        a.setup(config)
        assert a.p_passive == x_b.shape[1]
        assert a.schedule is not None
        for t, batch in enumerate(a.schedule):
            rows = batch.rows
            # Step 1: a valid share, encrypted with randomness A chose and recorded.
            share = steps.active_residual_share(a.view.x[rows], a.w, a.view.y[rows])
            a_enc, non_square = _encrypt_with_uniform_randomness(key, p, share)
            b_enc = a.shares(t, rows, a_enc)
            # Steps 3-4, honestly: [[X_A^T b + R_A]]_B, and B's [[h_B + R_B]]_A.
            step4 = a.gradients(t, b_enc)
            # The attack: the Legendre symbol of each output's randomness
            # against the parity of the subset sum of B's fixed-point features.
            fixed = steps.fixed_transpose(x_b[rows])  # p_B x m, what B multiplies by
            truth = (np.abs(fixed[:, non_square]).sum(axis=1) % 2).astype(int)
            guess = [int(gmpy2.legendre(mpz(c) % p, p) == -1) for c in step4.grad_b.values]
            correct += int(np.sum(truth == np.array(guess)))
            total += a.p_passive
            # Step 5: B's gradient back, so that the job goes on.
            a.apply(t, step4)
        a.finish(len(a.schedule), aborted=True)
        a.close()
    finally:
        fed.stop()
    return AttackResult(correct, total)


def test_key_holder_reads_nothing_from_the_randomness_of_b_step3(tmp_path: Path, breast: BreastSplit) -> None:
    result = run_attack(tmp_path, breast, {})
    assert result.total >= 200
    assert 0.35 <= result.accuracy <= 0.65, f"attack accuracy {result.accuracy:.3f} over {result.total} bits"
    assert result.pvalue > 1e-3, f"attack accuracy {result.accuracy:.3f}, binomial p-value {result.pvalue:.2e}"


def test_planted_square_randomness_is_caught(tmp_path: Path, breast: BreastSplit) -> None:
    """PLANTED REGRESSION: B runs under the plant that restores the old
    randomness (squares only); the same attack must now read B's bits."""
    result = run_attack(tmp_path, breast, {"passive": PLANT})
    assert result.total >= 200
    assert result.accuracy >= 0.95, f"attack accuracy {result.accuracy:.3f} under the plant"
