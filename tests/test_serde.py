"""Property tests: fixed-point encoding, overflow bounds, and the chunked
wire format of vectors (round trips, bounded chunk sizes, refusals)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfl.common import serde
from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import CipherVector, PublicKey
from vfl.common.crypto.fixedpoint import decode, encode
from vfl.common.errors import FailedPrecondition, InvalidArgument, OutOfRange
from vfl.common.jobconfig import JobConfig
from vfl.v1 import common_pb2

BACKEND = get_backend("phe")
KEY = BACKEND.generate_keypair(512)
OTHER = BACKEND.generate_keypair(512)
reals = st.floats(min_value=-(2.0**19), max_value=2.0**19, allow_nan=False, allow_infinity=False)


@given(st.lists(reals, min_size=1, max_size=50), st.sampled_from([16, 20, 32]))
def test_fixed_point_round_trip(values, scale):
    n = KEY.public.n
    decoded = decode(encode(np.array(values), scale, n, bound=2.0**20), scale, n)
    np.testing.assert_allclose(decoded, values, rtol=0, atol=2.0 ** -(scale - 1))


@given(st.lists(reals, min_size=1, max_size=8), st.lists(reals, min_size=1, max_size=8))
@settings(max_examples=25, deadline=None)
def test_homomorphic_sum_of_negatives_decodes(xs, ys):
    """Negatives as n - |v| survive encryption and addition."""
    m = min(len(xs), len(ys))
    a, b = np.array(xs[:m]), np.array(ys[:m])
    n = KEY.public.n
    ca = BACKEND.encrypt(KEY.public, encode(a, 32, n, 2.0**20))
    cb = BACKEND.encrypt(KEY.public, encode(b, 32, n, 2.0**20))
    out = decode(BACKEND.decrypt(KEY, BACKEND.add(ca, cb)), 32, n)
    np.testing.assert_allclose(out, a + b, rtol=0, atol=2.0**-30)


@given(st.floats(min_value=2.0**20 * 1.0001, max_value=1e300) | st.just(float("nan")) | st.just(float("inf")))
def test_encoding_refuses_out_of_bound_values(value):
    with pytest.raises(OutOfRange):
        encode(np.array([1.0, value]), 32, KEY.public.n, bound=2.0**20)


@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=3000))
@settings(max_examples=30, deadline=None)
def test_chunks_round_trip_and_stay_bounded(n_ciphers, n_rows):
    small_chunk = 4096
    values = tuple(range(1, n_ciphers + 1))
    ciphers = CipherVector(KEY.public, values)
    header = serde.step_header("job-1", 3, b"\x01" * 32)
    old = serde.CHUNK_BYTES
    serde.CHUNK_BYTES = small_chunk  # small chunks so that many are produced
    try:
        chunks = list(serde.to_chunks(header, rows=range(n_rows), ciphers=ciphers, residues=(KEY.public, [5] * 7)))
    finally:
        serde.CHUNK_BYTES = old
    assert all(c.ByteSize() <= small_chunk + serde.MAX_ROWS_PER_CHUNK * 8 for c in chunks)
    assert [c.HasField("header") for c in chunks].count(True) == 1
    msg = serde.from_chunks(chunks, "test")
    assert msg.header == header
    assert msg.rows == list(range(n_rows))
    if n_ciphers:
        assert msg.ciphers(KEY.public, "test").values == values
    assert msg.residues(KEY.public, "test") == [5] * 7


def test_vectors_under_another_key_are_refused():
    chunks = list(serde.to_chunks(None, ciphers=BACKEND.encrypt(KEY.public, [1, 2])))
    msg = serde.from_chunks(chunks, "step")
    with pytest.raises(FailedPrecondition, match="under key"):
        msg.ciphers(OTHER.public, "step")
    assert len(msg.ciphers(KEY.public, "step")) == 2


@given(st.binary(max_size=300))
def test_garbage_ciphertext_bytes_are_refused_cleanly(data):
    vec = common_pb2.CipherVector(key_fingerprint=KEY.public.fingerprint, width=KEY.public.cipher_width, data=data)
    try:
        out = serde.cipher_vector_from_proto(vec, KEY.public, "x")
    except InvalidArgument:
        return
    assert all(0 < c < KEY.public.n_square for c in out.values)


def test_out_of_range_ciphertext_is_refused():
    width = KEY.public.cipher_width
    for bad in (0, KEY.public.n_square):
        vec = common_pb2.CipherVector(
            key_fingerprint=KEY.public.fingerprint, width=width, data=bad.to_bytes(width + 1, "big")[-width:]
        )
        with pytest.raises(InvalidArgument, match=r"\[1, n\^2\)"):
            serde.cipher_vector_from_proto(vec, KEY.public, "x")


def test_header_only_on_first_chunk():
    h = serde.step_header("j", 0, b"")
    with pytest.raises(InvalidArgument, match="first chunk"):
        serde.from_chunks([common_pb2.StepChunk(), common_pb2.StepChunk(header=h)], "x")


def test_public_key_fingerprint_is_checked():
    msg = serde.public_key_to_proto(KEY.public)
    assert serde.public_key_from_proto(msg, "k", 256) == KEY.public
    msg.fingerprint = b"\x00" * 32
    with pytest.raises(InvalidArgument, match="fingerprint"):
        serde.public_key_from_proto(msg, "k", 256)
    with pytest.raises(InvalidArgument, match="at least 2048 bits"):
        serde.public_key_from_proto(serde.public_key_to_proto(KEY.public), "k", 2048)
    with pytest.raises(InvalidArgument, match="odd modulus"):
        serde.public_key_from_proto(serde.public_key_to_proto(PublicKey(2**600)), "k", 256)


@given(st.builds(JobConfig, epochs=st.integers(1, 50), batch_size=st.integers(2, 5000), seed=st.integers(0, 2**40)))
def test_config_round_trip(config):
    assert serde.config_from_proto(serde.config_to_proto(config)) == config


def test_unset_config_fields_take_defaults():
    assert serde.config_from_proto(common_pb2.TrainingConfig()) == JobConfig()


def test_single_chunk_merges_a_small_step_and_refuses_a_large_one():
    header = serde.step_header("job", 3, b"\1" * 32)
    enc = BACKEND.encrypt(KEY.public, [1, 2, 3])
    parts = list(serde.to_chunks(header, rows=[4, 5, 6], ciphers=enc))
    assert len(parts) == 2  # rows and ciphertexts travel in separate chunks when streamed
    one = serde.single_chunk(parts)
    assert one is not None
    msg = serde.from_chunks([one], "one")
    assert msg.rows == [4, 5, 6] and msg.header == header
    assert msg.ciphers(KEY.public, "c").values == enc.values
    many = serde.CHUNK_BYTES // KEY.public.cipher_width + 1
    big = list(serde.to_chunks(header, ciphers=BACKEND.encrypt(KEY.public, [0] * many)))
    assert serde.single_chunk(big) is None
    assert serde.fits_one_chunk(10, 256) and not serde.fits_one_chunk(serde.CHUNK_BYTES, 1)
