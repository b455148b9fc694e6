"""Hiding encryptions (`encrypt(..., hiding=True)`): their randomness is
uniform over the whole randomness group, so that multiplied into a product
whose randomness the key holder chose, the product's randomness tells the key
holder nothing. Checked on the quadratic characters a key holder can compute
from the factors (the Legendre-symbol attack of tests/attacks/
test_paillier_randomness.py), with the other operand's randomness fixed."""

from __future__ import annotations

import secrets

import gmpy2
import pytest
from gmpy2 import mpz
from scipy.stats import binomtest

from vfl.common.crypto.backend import CipherVector, PrivateKey, get_backend
from vfl.common.crypto.fast_backend import generate_ou, generate_paillier

TRIALS = 240


def _paillier_key_with_p_1_mod_4() -> tuple[PrivateKey, int]:
    """A key and a prime factor = 1 mod 4, where -x^2 (DJN's base) is a square."""
    while True:
        key = generate_paillier(1024)
        for f in (key.p, key.q):
            if f % 4 == 1:
                return key, f


def _balanced(symbols: list[int]) -> None:
    minus = sum(1 for s in symbols if s == -1)
    assert all(s in (-1, 1) for s in symbols)
    assert 0.35 <= minus / len(symbols) <= 0.65, f"{minus} of {len(symbols)} symbols are -1"
    assert binomtest(minus, len(symbols), 0.5).pvalue > 1e-4


@pytest.mark.parametrize("backend_name", ["paillier", "phe"])
def test_paillier_hiding_randomness_is_independent_of_the_product(backend_name: str) -> None:
    backend = get_backend(backend_name)
    key, p = _paillier_key_with_p_1_mod_4()
    n, n2 = mpz(key.public.n), mpz(key.public.n_square)
    # The other operand, as a key holder would craft it: randomness a fixed
    # square (Legendre symbol +1) and a known message.
    y = mpz(secrets.randbelow(int(n)))
    product = (1 + 7 * n) * gmpy2.powmod(y * y, n, n2) % n2
    symbols = []
    for _ in range(TRIALS):
        fresh = backend.encrypt(key.public, [11], hiding=True).values[0]
        c = product * fresh % n2
        assert backend.decrypt(key, CipherVector(key.public, (int(c),))) == [18]
        # (1 + n)^m = 1 mod p, so (c | p) is the Legendre symbol of the randomness.
        symbols.append(gmpy2.legendre(c % p, p))
    _balanced(symbols)


def test_ou_hiding_randomness_is_independent_of_the_product() -> None:
    backend = get_backend("ou")
    key = generate_ou(1024)
    pub = key.public
    n, g = mpz(pub.n), mpz(pub.g)
    p, q = mpz(key.p), mpz(key.q)
    # A crafted operand: G^m times a fixed component outside <g, h> (1 mod p^2,
    # a non-residue mod q), which OU decryption ignores.
    non_residue = next(z for z in range(2, 1000) if gmpy2.legendre(z, q) == -1)
    outside = gmpy2.invert(p * p, q) * (non_residue - 1) % q * p * p + 1  # 1 mod p^2, non_residue mod q
    product = gmpy2.powmod(g, 7, n) * outside % n
    mod_q, mod_p = [], []
    for _ in range(TRIALS):
        fresh = backend.encrypt(pub, [11], hiding=True)
        c = product * mpz(fresh.values[0]) % n
        assert backend.decrypt(key, CipherVector(pub, (int(c),))) == [18]
        # The randomness the key holder reads: c * G^-m.
        rho = c * gmpy2.powmod(g, -18, n) % n
        mod_q.append(gmpy2.legendre(rho % q, q))
        mod_p.append(gmpy2.legendre(rho % p, p))
    _balanced(mod_q)
    _balanced(mod_p)


@pytest.mark.parametrize("backend_name", ["ou", "paillier", "phe"])
def test_hiding_and_rerandomised_ciphertexts_decrypt(backend_name: str) -> None:
    backend = get_backend(backend_name)
    own = "paillier" if backend_name == "phe" else backend_name
    key = generate_ou(1024) if own == "ou" else generate_paillier(1024)
    n = key.public.n
    values = [0, 1, 2**100, n - 1, n - 2**100]
    enc = backend.encrypt(key.public, values, hiding=True)
    assert backend.decrypt(key, enc) == [v % key.plaintext_modulus for v in values]
    again = backend.rerandomise(enc)
    assert again.values != enc.values
    assert backend.decrypt(key, again) == backend.decrypt(key, enc)
