"""Cost of a hiding encryption (PROTOCOL.md: fresh encryptions that mask or
re-randomise use randomness uniform over the whole group), 2048-bit keys.

`python -m benchmarks.hiding_cost`: ms per encryption of
- before: the old scheme, h_s^r from a fixed-base table with a 464-bit
  exponent (256 + 128 + 80, the wide pool);
- after, computed inline (an empty pool): r^n mod n^2 (Paillier), s^n mod n
  (OU), a full exponentiation;
- after, from the idle-time pool: what the protocol step pays;
and OU decryption by t (before) and by p - 1 (after).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import gmpy2
from gmpy2 import mpz

from vfl.common.crypto.backend import PrivateKey
from vfl.common.crypto.fast_backend import PaillierBackend, generate_ou, generate_paillier
from vfl.common.crypto.multiexp import FixedBaseTable
from vfl.common.crypto.pool import GATE

OLD_WIDE_BITS = 256 + 128 + 80


def per_call_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def main(bits: int = 2048, batch: int = 64) -> None:
    backend = PaillierBackend()
    for name, key in (("paillier", generate_paillier(bits)), ("ou", generate_ou(bits))):
        measure(backend, name, key, batch)


def measure(backend: PaillierBackend, name: str, key: PrivateKey, batch: int) -> None:
    bits = key.public.bits
    pub = key.public
    n = mpz(pub.n)
    modulus = mpz(pub.cipher_modulus)
    if name == "paillier":
        x = mpz(secrets.randbelow(pub.n))
        old_base = gmpy2.powmod((-(x * x)) % n, n, modulus)
    else:
        old_base = mpz(pub.h)
    old = FixedBaseTable(old_base, modulus)
    old.pow((1 << OLD_WIDE_BITS) - 1)
    before = per_call_ms(lambda: old.pow(secrets.randbits(OLD_WIDE_BITS)) * 12345 % modulus, 200)
    backend.prepare(pub)
    ops = backend._public_ops(pub)
    inline = per_call_ms(ops.hiding_randomiser, 20 if name == "paillier" else 100)
    pool = ops.randomness.hiding
    pool.demand(batch)
    deadline = time.time() + 120
    while pool.available < batch and time.time() < deadline:
        time.sleep(0.05)
    plaintexts = [secrets.randbelow(1 << 200) for _ in range(batch)]
    with GATE.busy():  # the filler pauses, as during a protocol step
        start = time.perf_counter()
        backend.encrypt(pub, plaintexts, hiding=True)
        pooled = (time.perf_counter() - start) / batch * 1e3
    print(
        f"{name} {bits}: hiding encryption before {before:.3f} ms, after inline {inline:.3f} ms, "
        f"after from the pool {pooled:.3f} ms (pool held {pool.available + batch} of {batch} asked)"
    )
    if name == "ou":
        p2 = mpz(key.p) ** 2
        c = mpz(backend.encrypt(pub, [5], hiding=True).values[0]) % p2
        by_t = per_call_ms(lambda: gmpy2.powmod(c, key.t, p2), 300)
        by_p1 = per_call_ms(lambda: gmpy2.powmod(c, key.p - 1, p2), 300)
        print(f"ou {bits}: decryption exponent t {by_t:.3f} ms, p - 1 {by_p1:.3f} ms")


if __name__ == "__main__":
    main()
