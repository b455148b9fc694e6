"""Fast Paillier and Okamoto-Uchiyama over gmpy2 (backends "paillier" and "ou").

Both backends compute on either scheme's ciphertexts (a peer may use the other
one); the name picks the scheme of this party's own key.

What makes them fast, each measured in `make bench`:
- Encryption: g^m and the randomness h^r come from fixed-base tables
  (`FixedBaseTable`), one multiplication per 8-bit window of the exponent.
  Randomness exponents are short (RANDOM_BITS), the assumption of
  Damgard-Jurik-Nielsen's Paillier variant and of HEU's ZPaillier and OU:
  h^r with r of 256 bits is indistinguishable from a random element of <h>
  (a kangaroo search for r costs 2^128). Paillier's h_s = x^n mod n^2 for x
  uniform in Z_n^* is chosen by the encryptor and kept in memory only.
- Hiding encryptions (`encrypt(..., hiding=True)`: every fresh encryption that
  masks or re-randomises a value going back to the key holder, i.e. step 3,
  the loss share and prediction) take randomness uniform over the whole
  randomness group, whatever randomness the key holder put in the
  ciphertexts it is multiplied into: Paillier r^n mod n^2 for r uniform in
  Z_n^*, OU s^n mod n for s uniform in Z_n^*. Each is a full exponentiation,
  precomputed in an idle-time pool (`pool.py`) with the GIL released.
- Decryption: Paillier by CRT (exponent p - 1 modulo p^2 and q^2); OU by one
  exponentiation by p - 1 modulo p^2 (s^n has a component of order dividing
  p - 1 that an exponent t would not remove; see docs/CRYPTO.md).
- X^T [[v]] as a multi-exponentiation (`multiexp.matvec_powers`).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence

import gmpy2
import numpy as np
from gmpy2 import mpz

from vfl.common.crypto.backend import (
    SCHEME_OU,
    SCHEME_PAILLIER,
    CipherVector,
    HEBackend,
    PrivateKey,
    PublicKey,
    register_backend,
)
from vfl.common.crypto.multiexp import FixedBaseTable, ParallelMatvec
from vfl.common.crypto.pool import FILLER, RandomnessPool, random_power_pool
from vfl.common.errors import InvalidArgument

RANDOM_BITS = 256
PRIMALITY_ROUNDS = 40
# Hiding randomisers kept ready per key: protocol steps need p + 1 per
# iteration (p a party's feature count), prediction one per id.
HIDING_POOL_CAPACITY = 256
HIDING_POOL_MAX = 1 << 14


def _random_exact_bits(bits: int) -> mpz:
    """Uniform with exactly `bits` bits, the top two set (so products of two
    such numbers have exactly twice the bits)."""
    return mpz(secrets.randbits(bits)) | (mpz(3) << (bits - 2)) | 1


def random_prime(bits: int) -> mpz:
    while True:
        p = gmpy2.next_prime(_random_exact_bits(bits))
        if p.bit_length() == bits and gmpy2.is_prime(p, PRIMALITY_ROUNDS):
            return p


def _random_unit(n: mpz) -> mpz:
    while True:
        x = mpz(secrets.randbelow(int(n)))
        if gmpy2.gcd(x, n) == 1:
            return x


def _powmod_released(base: mpz, exponent: mpz, modulus: mpz) -> mpz:
    """A full modular exponentiation with the GIL released, so that a pool
    filler caught in one does not hold up the thread with protocol work."""
    with gmpy2.context(gmpy2.get_context(), allow_release_gil=True):
        return gmpy2.powmod(base, exponent, modulus)


def paillier_hiding_randomiser(n: mpz, n_square: mpz) -> mpz:
    """r^n mod n^2 for r uniform in Z_n^*: uniform over the n-th residues,
    the whole randomness part of Z_{n^2}^* (for gcd(n, phi(n)) = 1)."""
    return _powmod_released(_random_unit(n), n, n_square)


def ou_hiding_randomiser(n: mpz) -> mpz:
    """s^n mod n for s uniform in Z_n^*: for an honest key (gcd(q, p - 1) = 1,
    p not dividing q - 1), uniform over the whole non-message part of Z_n^*,
    i.e. the order p - 1 subgroup mod p^2 times Z_q^*, which contains <h> and
    every component a crafted ciphertext may carry outside <g, h>."""
    return _powmod_released(_random_unit(n), n, n)


def paillier_short_base(n: mpz, n_square: mpz) -> mpz:
    """h_s = x^n mod n^2 for x uniform in Z_n^*, the base of non-hiding
    (short exponent) randomness. Not a fixed square: its Legendre symbols mod
    p and q are uniform (DJN's -x^2 is always a square mod a prime factor
    p = 1 mod 4)."""
    return gmpy2.powmod(_random_unit(n), n, n_square)


def generate_paillier(bits: int) -> PrivateKey:
    half = bits // 2
    while True:
        p, q = random_prime(half), random_prime(bits - half)
        n = p * q
        if p != q and n.bit_length() == bits and gmpy2.gcd(n, (p - 1) * (q - 1)) == 1:
            return PrivateKey(PublicKey(int(n)), int(p), int(q))


def ou_subgroup_bits(bits: int) -> int:
    """Size of t, the prime order of OU's message subgroup: 224 bits for
    2048-bit keys (NIST's 112-bit level, as HEU), at most a third of |p|."""
    secret = (bits + 2) // 3
    target = 256 if bits >= 3072 else 224 if bits >= 2048 else 160
    return min(target, secret // 3)


def generate_ou(bits: int) -> PrivateKey:
    """n = p^2 q with |p| = ceil(bits / 3), p = t u + 1 for a prime t (so that
    decryption exponentiates by t), G = g^u, H = g'^(n u) (as HEU's OU)."""
    secret = (bits + 2) // 3
    t_bits = ou_subgroup_bits(bits)
    t = random_prime(t_bits)
    while True:
        u = _random_exact_bits(secret - t_bits) & ~mpz(1)
        p = t * u + 1
        if p.bit_length() == secret and gmpy2.is_prime(p, PRIMALITY_ROUNDS):
            break
    p2 = p * p
    # q uniform among primes that give n exactly `bits` bits.
    q_lo, q_hi = (mpz(1) << (bits - 1)) // p2 + 1, ((mpz(1) << bits) - 1) // p2
    while True:
        q = gmpy2.next_prime(q_lo + mpz(secrets.randbelow(int(q_hi - q_lo))))
        n = p2 * q
        # gcd(q, p - 1) = 1 and p not dividing q - 1: then s -> s^n is onto
        # the non-message part of Z_n^* (hiding randomisers are uniform).
        coprime = (p - 1) % q != 0 and (q - 1) % p != 0
        if q <= q_hi and q != p and coprime and n.bit_length() == bits and gmpy2.is_prime(q, PRIMALITY_ROUNDS):
            break
    while True:
        g = _random_unit(n)
        if (gmpy2.powmod(g, p - 1, p2) - 1) // p % p:
            break
    g_prime = _random_unit(n)
    public = PublicKey(int(n), SCHEME_OU, int(gmpy2.powmod(g, u, n)), int(gmpy2.powmod(g_prime, n * u, n)))
    return PrivateKey(public, int(p), int(q), int(t))


class _Randomness:
    """Randomisers from pools: h^r with r of RANDOM_BITS (own shares under the
    encryptor's own key) and hiding ones, uniform over the whole randomness
    group (see module docstring)."""

    def __init__(self, table: FixedBaseTable, hiding: Callable[[], mpz]) -> None:
        self.table = table
        self.standard = random_power_pool(table.pow, RANDOM_BITS)
        self.hiding = RandomnessPool(hiding, HIDING_POOL_CAPACITY, HIDING_POOL_MAX)
        FILLER.register(self.standard)
        FILLER.register(self.hiding)

    def demand(self, n: int, hiding: bool) -> None:
        (self.hiding if hiding else self.standard).demand(n)

    def take(self, hiding: bool) -> mpz:
        return self.hiding.take() if hiding else self.standard.take()


class _PaillierPublicOps:
    def __init__(self, key: PublicKey) -> None:
        self.n = mpz(key.n)
        self.modulus = self.n * self.n
        h_s = paillier_short_base(self.n, self.modulus)
        self.randomness = _Randomness(FixedBaseTable(h_s, self.modulus), self.hiding_randomiser)

    def hiding_randomiser(self) -> mpz:
        return paillier_hiding_randomiser(self.n, self.modulus)

    def encrypt(self, m: int, hiding: bool) -> mpz:
        # g = n + 1, so g^m = 1 + m n mod n^2: no exponentiation.
        return (1 + m * self.n) * self.randomness.take(hiding) % self.modulus


class _OUPublicOps:
    def __init__(self, key: PublicKey) -> None:
        self.n = self.modulus = mpz(key.n)
        self.half = self.n // 2
        self.limit = 1 << key.plaintext_bits
        self.g = FixedBaseTable(key.g, self.n)
        self.g_inv = FixedBaseTable(gmpy2.invert(mpz(key.g), self.n), self.n)
        self.randomness = _Randomness(FixedBaseTable(key.h, self.n), self.hiding_randomiser)

    def hiding_randomiser(self) -> mpz:
        return ou_hiding_randomiser(self.n)

    def encrypt(self, m: int, hiding: bool) -> mpz:
        # Residues above n/2 encode negatives (n - |v|): G^-|v| via G's inverse.
        gm = self.g_inv.pow(self.n - m) if m > self.half else self.g.pow(m)
        return gm * self.randomness.take(hiding) % self.n

    def check_plaintext(self, i: int, m: int) -> None:
        if min(m, self.n - m) >= self.limit:
            raise InvalidArgument(
                f"plaintext {i}: |value| must be below 2^{self.limit.bit_length() - 1} for this OU key"
            )


class _PaillierPrivateOps:
    def __init__(self, key: PrivateKey) -> None:
        n = mpz(key.public.n)
        self.p, self.q = mpz(key.p), mpz(key.q)
        self.p2, self.q2 = self.p * self.p, self.q * self.q
        self.hp = gmpy2.invert((gmpy2.powmod(n + 1, self.p - 1, self.p2) - 1) // self.p, self.p)
        self.hq = gmpy2.invert((gmpy2.powmod(n + 1, self.q - 1, self.q2) - 1) // self.q, self.q)
        self.q_inv = gmpy2.invert(self.q, self.p)

    def decrypt(self, c: int) -> int:
        mp = (gmpy2.powmod(c, self.p - 1, self.p2) - 1) // self.p * self.hp % self.p
        mq = (gmpy2.powmod(c, self.q - 1, self.q2) - 1) // self.q * self.hq % self.q
        return int(mq + (mp - mq) * self.q_inv % self.p * self.q)


class _OUPrivateOps:
    def __init__(self, key: PrivateKey) -> None:
        self.p = mpz(key.p)
        self.p2 = self.p * self.p
        # The exponent p - 1 (not t) removes every non-message component mod
        # p^2: hiding randomisers s^n have order dividing p - 1, not t.
        self.e = self.p - 1
        self.gp_inv = gmpy2.invert((gmpy2.powmod(mpz(key.public.g), self.e, self.p2) - 1) // self.p, self.p)

    def decrypt(self, c: int) -> int:
        x = gmpy2.powmod(mpz(c) % self.p2, self.e, self.p2)
        return int((x - 1) // self.p * self.gp_inv % self.p)


class _FastBackend(HEBackend):
    """Shared by both registered names; `own_scheme` picks key generation."""

    schemes = (SCHEME_PAILLIER, SCHEME_OU)

    def __init__(self) -> None:
        self._public: dict[bytes, _PaillierPublicOps | _OUPublicOps] = {}
        self._private: dict[bytes, _PaillierPrivateOps | _OUPrivateOps] = {}
        self._lock = threading.Lock()
        self._matvec = ParallelMatvec(1)

    def set_workers(self, workers: int) -> None:
        """Processes for large products (1 = in-process); see ParallelMatvec."""
        self._matvec = ParallelMatvec(workers)

    def _public_ops(self, key: PublicKey) -> _PaillierPublicOps | _OUPublicOps:
        ops = self._public.get(key.fingerprint)
        if ops is None:
            self.require_scheme(key, "encrypt")
            with self._lock:
                ops = self._public.get(key.fingerprint)
                if ops is None:
                    ops = _PaillierPublicOps(key) if key.scheme == SCHEME_PAILLIER else _OUPublicOps(key)
                    self._public[key.fingerprint] = ops
        return ops

    def _private_ops(self, key: PrivateKey) -> _PaillierPrivateOps | _OUPrivateOps:
        ops = self._private.get(key.public.fingerprint)
        if ops is None:
            ops = _PaillierPrivateOps(key) if key.public.scheme == SCHEME_PAILLIER else _OUPrivateOps(key)
            self._private[key.public.fingerprint] = ops
        return ops

    def prepare(self, key: PublicKey | PrivateKey) -> None:
        if isinstance(key, PrivateKey):
            self._private_ops(key)
            key = key.public
        ops = self._public_ops(key)
        # Residuals, masks and randomness exponents: grow the tables now.
        ops.randomness.table.pow((1 << RANDOM_BITS) - 1)
        if isinstance(ops, _OUPublicOps):
            for table in (ops.g, ops.g_inv):
                table.pow((1 << 224) - 1)

    def generate_keypair(self, bits: int) -> PrivateKey:
        return generate_paillier(bits) if self.own_scheme == SCHEME_PAILLIER else generate_ou(bits)

    def encrypt(self, key: PublicKey, plaintexts: Sequence[int], hiding: bool = False) -> CipherVector:
        ops = self._public_ops(key)
        n = key.n
        for i, m in enumerate(plaintexts):
            if not 0 <= m < n:
                raise InvalidArgument(f"plaintext {i}: expected a residue in [0, n)")
            if isinstance(ops, _OUPublicOps):
                ops.check_plaintext(i, m)
        ops.randomness.demand(len(plaintexts), hiding)
        return CipherVector(key, tuple(int(ops.encrypt(m, hiding)) for m in plaintexts))

    def decrypt(self, key: PrivateKey, ciphers: CipherVector) -> list[int]:
        ciphers.require_key(key.public, "decrypt")
        ops = self._private_ops(key)
        return [ops.decrypt(c) for c in ciphers.values]

    def add(self, a: CipherVector, b: CipherVector) -> CipherVector:
        b.require_key(a.key, "add")
        a.require_length(len(b), "add")
        m = mpz(a.key.cipher_modulus)
        return CipherVector(a.key, tuple(int(mpz(x) * y % m) for x, y in zip(a.values, b.values, strict=True)))

    def matvec(self, matrix: np.ndarray, ciphers: CipherVector) -> CipherVector:
        self.require_scheme(ciphers.key, "matvec")
        rows, cols = matrix.shape
        ciphers.require_length(cols, "matvec")
        out = self._matvec(ciphers.values, matrix, ciphers.key.cipher_modulus)
        return CipherVector(ciphers.key, tuple(int(c) for c in out))


@register_backend
class OUBackend(_FastBackend):
    name = "ou"
    own_scheme = SCHEME_OU


@register_backend
class PaillierBackend(_FastBackend):
    name = "paillier"
    own_scheme = SCHEME_PAILLIER
