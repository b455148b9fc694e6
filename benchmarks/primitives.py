"""Throughput of the crypto primitives the protocol is made of, per backend:
encryptions and decryptions per second over vectors of 64, and the 20 x 64
plaintext-matrix by ciphertext-vector product the gradient steps use.

The project's backends are measured through `vfl.common.crypto.get_backend`;
SecretFlow's HEU (OU and ZPaillier, `heu.numpy`) is measured the same way
when `import heu` works, as an outside reference point. Every measurement is
checked (the decrypted product equals M v) so that no fast path is timed
doing nothing.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from vfl.common.crypto import HEBackend, PublicKey, get_backend
from vfl.common.crypto.fixedpoint import signed
from vfl.common.errors import VflError

VECTOR = 64
MATRIX_ROWS = 20
# Plaintexts like the protocol's: residuals at scale 2^32 (|v| < 2^31 covers
# |v| < 0.5), matrix entries are features at scale 2^20 (|x| < 8 -> 2^23).
PLAIN_BOUND = 2**31
MATRIX_BOUND = 2**23


def _timed(fn: Callable[[], object], min_s: float) -> tuple[int, float]:
    """Call fn until min_s has passed (at least once): (calls, seconds)."""
    calls = 0
    t0 = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return calls, elapsed


def _inputs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.integers(-PLAIN_BOUND, PLAIN_BOUND, size=VECTOR, dtype=np.int64)
    m = rng.integers(-MATRIX_BOUND, MATRIX_BOUND, size=(MATRIX_ROWS, VECTOR), dtype=np.int64)
    return v, m


def _expected(m: np.ndarray, v: np.ndarray) -> list[int]:
    # Python ints: the products need more than 64 bits in general.
    return [sum(int(a) * int(b) for a, b in zip(row, v, strict=True)) for row in m]


def _rates(enc: tuple[int, float], dec: tuple[int, float], mv: tuple[int, float]) -> dict[str, float]:
    return {
        "encrypt_per_s": round(enc[0] * VECTOR / enc[1], 1),
        "decrypt_per_s": round(dec[0] * VECTOR / dec[1], 1),
        "matvec_ms": round(1000 * mv[1] / mv[0], 2),
    }


def measure_backend(name: str, bits: int, min_s: float) -> dict[str, Any]:
    """Rates of one of the project's backends (raises if it is unknown)."""
    backend = get_backend(name)
    t0 = time.perf_counter()
    key = backend.generate_keypair(bits)
    keygen_s = time.perf_counter() - t0
    v, m = _inputs(seed=1)
    n = key.public.n
    residues = [int(x) % n for x in v]
    cv = backend.encrypt(key.public, residues)
    product = backend.matvec(m, cv)
    # Decryption returns residues modulo the plaintext modulus: n for
    # Paillier, the secret p for Okamoto-Uchiyama (where the key says so).
    modulus = int(getattr(key, "plaintext_modulus", n))
    if signed(backend.decrypt(key, product), modulus) != _expected(m, v):
        raise AssertionError(f"{name}: decrypted matvec differs from M v")
    with _pool_paused() as paused:
        # The warm-up drains any precomputed randomness, so the timed calls
        # measure the steady cost of an encryption, not the pool's.
        _timed(lambda: backend.encrypt(key.public, residues), min_s)
        enc = _timed(lambda: backend.encrypt(key.public, residues), min_s)
        dec = _timed(lambda: backend.decrypt(key, cv), min_s)
        mv = _timed(lambda: backend.matvec(m, cv), min_s)
        uniform = _uniform_encrypt_rate(backend, key.public, min_s)
    return {
        **_rates(enc, dec, mv),
        "encrypt_uniform_per_s": uniform,
        "keygen_s": round(keygen_s, 3),
        "randomness_pool_paused": paused,
        "source": f"vfl.common.crypto.get_backend({name!r})",
    }


@contextmanager
def _pool_paused() -> Iterator[bool]:
    """Hold the crypto package's idle gate busy, when it has one: its
    background thread then precomputes no encryption randomness while we time
    (it only runs while a party is idle), so it neither competes for the GIL
    nor refills what the warm-up drained. Yields whether a gate was held."""
    try:
        from vfl.common.crypto import pool
    except ImportError:
        yield False
        return
    gate = getattr(pool, "GATE", None)
    if gate is None:
        yield False
        return
    with gate.busy():
        yield True


def _uniform_encrypt_rate(backend: HEBackend, key: PublicKey, min_s: float) -> float | None:
    """Encryptions of residues uniform mod n (as Paillier's masks are). Same
    cost as small ones in Paillier; a scheme whose cost grows with the
    plaintext shows it here. None if the backend refuses such plaintexts."""
    wide = [secrets.randbelow(key.n) for _ in range(VECTOR)]
    try:
        _timed(lambda: backend.encrypt(key, wide), min_s)  # warm-up, as above
        calls, seconds = _timed(lambda: backend.encrypt(key, wide), min_s)
    except VflError:
        return None
    return round(calls * VECTOR / seconds, 1)


LARGE_ROWS, LARGE_VECTOR = 40, 1024


def measure_process_pool(name: str, bits: int, min_s: float) -> dict[str, Any]:
    """A large product (40 x 1024, a batch of 1024 rows and 40 features) in
    the process and split across a process pool of one worker per core
    (`vfl.common.crypto.multiexp.ParallelMatvec`), both checked against M v."""
    import os

    from vfl.common.crypto.multiexp import ParallelMatvec, matvec_powers

    backend = get_backend(name)
    key = backend.generate_keypair(bits)
    rng = np.random.default_rng(2)
    v = rng.integers(-PLAIN_BOUND, PLAIN_BOUND, size=LARGE_VECTOR, dtype=np.int64)
    m = rng.integers(-(2**19), 2**19, size=(LARGE_ROWS, LARGE_VECTOR), dtype=np.int64)
    cv = backend.encrypt(key.public, [int(x) % key.public.n for x in v])
    modulus = key.public.cipher_modulus
    workers = os.cpu_count() or 1
    pool = ParallelMatvec(workers, min_cost=0)
    try:
        pool._executor()  # spawn the workers before timing
        for fn in (matvec_powers, pool):
            out = [int(c) for c in fn(cv.values, m, modulus)]
            got = signed(backend.decrypt(key, type(cv)(key.public, tuple(out))), key.plaintext_modulus)
            if got != _expected(m, v):
                raise AssertionError(f"{name}: large product differs from M v")
        serial = _timed(lambda: matvec_powers(cv.values, m, modulus), min_s)
        pooled = _timed(lambda: pool(cv.values, m, modulus), min_s)
    finally:
        if pool._pool is not None:
            pool._pool.shutdown()
    serial_ms, pooled_ms = 1000 * serial[1] / serial[0], 1000 * pooled[1] / pooled[0]
    return {
        "large_matvec_shape": f"{LARGE_ROWS}x{LARGE_VECTOR}",
        "large_matvec_serial_ms": round(serial_ms, 1),
        "large_matvec_pool_ms": round(pooled_ms, 1),
        "pool_workers": workers,
    }


def heu_available() -> str | None:
    """None when `import heu` works, else why not."""
    try:
        import heu  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def measure_heu(schema_name: str, bits: int, min_s: float) -> dict[str, Any]:
    """Rates of HEU's numpy API for one schema ("OU" or "ZPaillier")."""
    from heu import numpy as hnp
    from heu import phe

    t0 = time.perf_counter()
    kit = hnp.setup(getattr(phe.SchemaType, schema_name), bits)
    keygen_s = time.perf_counter() - t0
    # Scale 1: the integers are already fixed point, as in the protocol, so the
    # exponents of the product are the same size as for the project's backends.
    params = phe.IntegerEncoderParams(1)
    v, m = _inputs(seed=1)
    pv, pm = kit.array(v, params), kit.array(m, params)
    encryptor, decryptor, evaluator = kit.encryptor(), kit.decryptor(), kit.evaluator()
    cv = encryptor.encrypt(pv)
    out = decryptor.decrypt(evaluator.matmul(pm, cv)).to_numpy(kit.integer_encoder(scale=1))
    if [int(x) for x in out] != _expected(m, v):
        raise AssertionError(f"HEU {schema_name}: decrypted matmul differs from M v")
    enc = _timed(lambda: encryptor.encrypt(pv), min_s)
    dec = _timed(lambda: decryptor.decrypt(cv), min_s)
    mv = _timed(lambda: evaluator.matmul(pm, cv), min_s)
    return {**_rates(enc, dec, mv), "keygen_s": round(keygen_s, 3), "source": f"heu.numpy {schema_name}"}


HEU_SCHEMAS = {"heu-ou": "OU", "heu-zpaillier": "ZPaillier"}
