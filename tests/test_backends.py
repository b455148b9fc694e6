"""Every crypto backend decrypts to the same values as the phe reference, on
random inputs including negatives and values at the edge of the plaintext
space; the multi-exponentiation kernels agree with one powmod per entry."""

from __future__ import annotations

import gmpy2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import SCHEME_OU, CipherVector, PrivateKey
from vfl.common.crypto.fixedpoint import signed
from vfl.common.crypto.multiexp import FixedBaseTable, ParallelMatvec, _bucket, _generic, _straus, matvec_powers
from vfl.common.errors import InvalidArgument

PHE = get_backend("phe")
FAST = {"paillier": get_backend("paillier"), "ou": get_backend("ou")}
KEYS: dict[str, PrivateKey] = {
    "phe": PHE.generate_keypair(512),
    "paillier": FAST["paillier"].generate_keypair(512),
    "ou": FAST["ou"].generate_keypair(1024),
}
# Products of a value with a 40-bit coefficient summed over 8 terms stay below
# the smallest plaintext space used here (OU-1024: 2^339).
VALUE_BITS = 250
COEF_BITS = 40

values = st.lists(
    st.one_of(
        st.integers(-(2**VALUE_BITS) + 1, 2**VALUE_BITS - 1),
        st.sampled_from([0, 1, -1, 2**VALUE_BITS - 1, -(2**VALUE_BITS) + 1]),
    ),
    min_size=1,
    max_size=8,
)


def decrypt_signed(backend, key: PrivateKey, ciphers: CipherVector) -> list[int]:
    return signed(backend.decrypt(key, ciphers), key.plaintext_modulus)


def run_ops(backend, key: PrivateKey, v: list[int], m: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    n = key.public.n
    enc = backend.encrypt(key.public, [x % n for x in v])
    return (
        decrypt_signed(backend, key, enc),
        decrypt_signed(backend, key, backend.add(enc, backend.rerandomise(enc))),
        decrypt_signed(backend, key, backend.matvec(m, enc)),
    )


@settings(max_examples=25, deadline=None)
@given(v=values, seed=st.integers(0, 2**32 - 1))
def test_every_backend_decrypts_what_phe_decrypts(v: list[int], seed: int) -> None:
    m = np.random.default_rng(seed).integers(-(2**COEF_BITS), 2**COEF_BITS, size=(3, len(v)), dtype=np.int64)
    exact = (v, [2 * x for x in v], [sum(int(c) * x for c, x in zip(row, v, strict=True)) for row in m])
    reference = run_ops(PHE, KEYS["phe"], v, m)
    assert reference == exact
    for name, backend in FAST.items():
        assert run_ops(backend, KEYS[name], v, m) == reference, name


@pytest.mark.parametrize("name", ["phe", "paillier", "ou"])
def test_values_at_the_edge_of_the_plaintext_space_round_trip(name: str) -> None:
    backend = PHE if name == "phe" else FAST[name]
    key = KEYS[name]
    edge = (1 << key.public.plaintext_bits) - 1
    n = key.public.n
    assert decrypt_signed(backend, key, backend.encrypt(key.public, [edge % n, -edge % n])) == [edge, -edge]


def test_ou_refuses_a_plaintext_beyond_its_space() -> None:
    key = KEYS["ou"]
    assert key.public.scheme == SCHEME_OU
    beyond = 1 << key.public.plaintext_bits
    with pytest.raises(InvalidArgument, match="plaintext 0"):
        FAST["ou"].encrypt(key.public, [beyond])
    with pytest.raises(InvalidArgument, match="plaintext 1"):
        FAST["ou"].encrypt(key.public, [0, key.public.n - beyond])


def test_paillier_ciphertexts_are_interchangeable_with_phe() -> None:
    """Same scheme, same wire format: either implementation decrypts the other's."""
    for key in (KEYS["phe"], KEYS["paillier"]):
        n = key.public.n
        v = [5, -(2**200), 2**300]
        from_fast = FAST["paillier"].encrypt(key.public, [x % n for x in v], hiding=True)
        from_phe = PHE.encrypt(key.public, [x % n for x in v])
        assert decrypt_signed(PHE, key, from_fast) == v
        assert decrypt_signed(FAST["paillier"], key, from_phe) == v


def test_phe_cannot_compute_on_ou_ciphertexts() -> None:
    key = KEYS["ou"]
    enc = FAST["ou"].encrypt(key.public, [1])
    with pytest.raises(Exception, match="scheme 'ou'"):
        PHE.matvec(np.ones((1, 1), dtype=np.int64), enc)


def test_fast_backends_compute_on_either_scheme() -> None:
    """A party's backend must handle its peer's scheme, whatever its own."""
    for own in FAST.values():
        for name in ("paillier", "ou"):
            key = KEYS[name]
            enc = own.encrypt(key.public, [3, key.public.n - 4])
            prod = own.matvec(np.array([[2, 5]], dtype=np.int64), enc)
            assert decrypt_signed(FAST[name], key, prod) == [6 - 20]


# --- kernels -------------------------------------------------------------------------

MODULUS = gmpy2.next_prime(gmpy2.mpz(2) ** 256 + 12345)


@settings(max_examples=40, deadline=None)
@given(
    n_bases=st.integers(1, 40),
    rows=st.integers(1, 4),
    bits=st.integers(1, 62),
    window=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_straus_and_bucket_agree_with_one_powmod_per_entry(
    n_bases: int, rows: int, bits: int, window: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    bases = [gmpy2.mpz(int(b)) for b in rng.integers(2, 2**62, size=n_bases)]
    hi = 2 ** min(bits, 62) - 1
    m = rng.integers(-hi, hi, size=(rows, n_bases), dtype=np.int64, endpoint=True)
    m[0, 0] = 0  # zero coefficients and all-zero rows too
    if rows > 1:
        m[1] = 0
    row_bits = [int(v).bit_length() for v in np.abs(m).max(axis=1)]
    expected = _generic(bases, m, MODULUS)
    assert _straus(bases, np.abs(m), m < 0, row_bits, window, MODULUS) == expected
    assert _bucket(bases, np.abs(m), m < 0, row_bits, window, MODULUS) == expected
    assert matvec_powers(bases, m, MODULUS) == expected


def test_matvec_takes_coefficients_beyond_int64() -> None:
    bases = [gmpy2.mpz(3), gmpy2.mpz(5)]
    m = np.array([[2**70, -(2**65)]], dtype=object)
    assert matvec_powers(bases, m, MODULUS) == _generic(bases, m, MODULUS)


@settings(max_examples=30, deadline=None)
@given(e=st.integers(0, 2**700))
def test_fixed_base_table_is_powmod(e: int) -> None:
    table = FixedBaseTable(7, MODULUS, window=6)
    assert table.pow(e) == gmpy2.powmod(7, e, MODULUS)


def test_parallel_matvec_splits_rows_across_processes_and_agrees() -> None:
    rng = np.random.default_rng(5)
    bases = [gmpy2.mpz(int(b)) for b in rng.integers(2, 2**62, size=30)]
    m = rng.integers(-(2**30), 2**30, size=(5, 30), dtype=np.int64)
    parallel = ParallelMatvec(2, min_cost=0)
    try:
        assert parallel(bases, m, MODULUS) == matvec_powers(bases, m, MODULUS)
        assert parallel._pool is not None  # it really used the pool
    finally:
        if parallel._pool is not None:
            parallel._pool.shutdown()
