"""The group arithmetic of the private set intersection (PROTOCOL.md,
"Alignment"; docs/CRYPTO.md, "Private set intersection: why ristretto255").

ristretto255 from libsodium, called through pysodium's loaded library with
preallocated buffers: one foreign call per point, no Python object per point
beyond the id itself. ctypes releases the GIL during each call, so the
points of one call are split across threads (`PsiSecret(workers=...)`).

Encodings:
- a group element is its 32-byte canonical ristretto255 encoding
  (RFC 9496, section 4.3.2); a vector of n elements is their n*32 bytes
  concatenated, with no header;
- H(x) = ristretto255_from_hash(SHA-512(len(DOMAIN) || DOMAIN || utf-8(x))),
  len(DOMAIN) as one byte: the one-way map of RFC 9496 (section 4.3.4) on 64
  uniform bytes. With DOMAIN = b"vfl-psi-v1" the prefix is the 11 bytes
  0x0a "vfl-psi-v1"; the length byte keeps a later DOMAIN that extends this
  one from sharing its inputs;
- a tag is H(x)^(k_A k_B), compared as 32 raw bytes; the canonical order of
  an intersection is its tags ascending bytewise (unsigned, memcmp order).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn, SupportsIndex

import numpy as np
import pysodium

from vfl.common.errors import InvalidArgument

POINT_BYTES = 32
DOMAIN = b"vfl-psi-v1"
CHUNK_POINTS = 32768  # points per gRPC message: 1 MiB
SCALAR_BYTES = 32
HASH_BYTES = 64
_PREFIX = bytes([len(DOMAIN)]) + DOMAIN
# Below this many points a call stays on the calling thread: starting
# threads costs more than they save.
_PARALLEL_MIN = 512

_TAG = np.dtype(f"S{POINT_BYTES}")  # raw 32 bytes, compared unsigned bytewise


class _Sodium:
    """The few libsodium functions used here, typed. Own function objects
    (not the library handle's attributes), so that setting argtypes does not
    change how pysodium calls the same symbols."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        def fn(name: str, restype: type | None, *argtypes: type) -> Callable[..., int]:
            proto = ctypes.CFUNCTYPE(restype, *argtypes)
            return proto((name, lib))

        vp = ctypes.c_void_p
        if fn("sodium_init", ctypes.c_int)() < 0:
            raise RuntimeError("libsodium: sodium_init failed")
        for name, size in (
            ("crypto_core_ristretto255_bytes", POINT_BYTES),
            ("crypto_core_ristretto255_scalarbytes", SCALAR_BYTES),
            ("crypto_core_ristretto255_hashbytes", HASH_BYTES),
        ):
            if fn(name, ctypes.c_size_t)() != size:
                raise RuntimeError(f"libsodium: {name} is not {size}")
        self.from_hash = fn("crypto_core_ristretto255_from_hash", ctypes.c_int, vp, vp)
        self.scalarmult = fn("crypto_scalarmult_ristretto255", ctypes.c_int, vp, vp, vp)
        self.is_valid_point = fn("crypto_core_ristretto255_is_valid_point", ctypes.c_int, vp)
        self.scalar_random = fn("crypto_core_ristretto255_scalar_random", None, vp)
        self.memzero = fn("sodium_memzero", None, vp, ctypes.c_size_t)


_SODIUM = _Sodium(pysodium.sodium)


def _writable(n_bytes: int) -> tuple[bytearray, int]:
    """A zeroed buffer and its address (the bytearray must outlive every use)."""
    buf = bytearray(n_bytes)
    return buf, ctypes.addressof((ctypes.c_char * n_bytes).from_buffer(buf)) if n_bytes else 0


def _address(data: bytes) -> int:
    """The address of a bytes object's own buffer, read in place (C only
    reads it; the caller keeps `data` alive): no copy of a 32 MB input."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


def _parallel(n: int, workers: int, work: Callable[[int, int], int | None]) -> int | None:
    """work(lo, hi) over [0, n) split into contiguous ranges, one per thread.
    Each returns the index of its first bad item or None; the smallest wins,
    so the error names the first bad item whatever the split."""
    if n < _PARALLEL_MIN or workers <= 1:
        return work(0, n)
    step = -(-n // workers)
    with ThreadPoolExecutor(workers, thread_name_prefix="psi") as pool:
        futures = [pool.submit(work, lo, min(n, lo + step)) for lo in range(0, n, step)]
        bad = [i for i in (f.result() for f in futures) if i is not None]
    return min(bad) if bad else None


def _hash_one(x: str, out: int) -> None:
    """H(x) into the 32 bytes at out. (from_hash has no failure case: it
    returns 0 for any 64 bytes.)"""
    _SODIUM.from_hash(out, hashlib.sha512(_PREFIX + x.encode("utf-8")).digest())


def _check_encodable(ids: Sequence[str], field: str) -> None:
    try:
        for x in ids:
            x.encode("utf-8")
    except UnicodeEncodeError:
        bad = [i for i, x in enumerate(ids) if not _utf8_ok(x)]
        raise InvalidArgument(
            f"{field}: {len(bad)} ids are not valid unicode (first at position {bad[0]}; expected text "
            "encodable as UTF-8, no lone surrogates)"
        ) from None


def _utf8_ok(x: str) -> bool:
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def hash_to_group(ids: Sequence[str], workers: int | None = None) -> bytes:
    """H(id) for each id, n*32 bytes in the order given (no scalar: for
    tests and the benchmark)."""
    _check_encodable(ids, "ids")
    n = len(ids)
    buf, out = _writable(n * POINT_BYTES)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            _hash_one(ids[i], out + POINT_BYTES * i)

    _parallel(n, workers or os.cpu_count() or 1, work)
    return bytes(buf)


class SecretForgotten(RuntimeError):
    """A PsiSecret used after forget(): a bug in the caller, not a bad input."""


class PsiSecret:
    """A fresh secret scalar for one alignment. Never serialised: pickling
    and copying raise TypeError; repr shows nothing secret; forget()
    overwrites the scalar (best effort: the C buffer is zeroed, no Python
    bytes copy of it is ever made) and makes later use raise
    SecretForgotten. Thread safe: blind_ids and blind_points may run
    concurrently; forget() waits for calls in progress."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._scalar: ctypes.Array[ctypes.c_char] | None = ctypes.create_string_buffer(SCALAR_BYTES)
        # Uniform in [1, L): libsodium draws from its CSPRNG (the OS's) and
        # rejects zero, so no tag can be the identity.
        _SODIUM.scalar_random(ctypes.addressof(self._scalar))
        self._in_use = 0
        self._cond = threading.Condition()

    def __repr__(self) -> str:
        state = "forgotten" if self._scalar is None else "live"
        return f"PsiSecret({state}, workers={self.workers})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a PsiSecret is never serialised or copied")

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("a PsiSecret is never serialised or copied")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a PsiSecret is never serialised or copied")

    def _acquire(self) -> int:
        with self._cond:
            if self._scalar is None:
                raise SecretForgotten("PsiSecret: used after forget()")
            self._in_use += 1
            return ctypes.addressof(self._scalar)

    def _release(self) -> None:
        with self._cond:
            self._in_use -= 1
            self._cond.notify_all()

    def _raise_all(self, src: int, n: int, out: int) -> int | None:
        """P^k for the n points at src into out; the index of the first bad point, if any."""
        scalar = self._acquire()
        try:

            def work(lo: int, hi: int) -> int | None:
                mult = _SODIUM.scalarmult
                for i in range(lo, hi):
                    off = POINT_BYTES * i
                    # -1: not a canonical encoding, or the result (so the
                    # point, as k != 0) is the identity.
                    if mult(out + off, scalar, src + off) != 0:
                        return i
                return None

            return _parallel(n, self.workers, work)
        finally:
            self._release()

    def blind_ids(self, ids: Sequence[str]) -> bytes:
        """H(id)^k for each id, n*32 bytes in the order given."""
        _check_encodable(ids, "ids")
        n = len(ids)
        buf, out = _writable(n * POINT_BYTES)
        scalar = self._acquire()
        try:

            def work(lo: int, hi: int) -> int | None:
                scratch = ctypes.create_string_buffer(POINT_BYTES)  # H(x), one per thread
                at = ctypes.addressof(scratch)
                mult = _SODIUM.scalarmult
                for i in range(lo, hi):
                    _hash_one(ids[i], at)
                    if mult(out + POINT_BYTES * i, scalar, at) != 0:
                        return i  # H(x) the identity: probability 2^-252
                return None

            bad = _parallel(n, self.workers, work)
        finally:
            self._release()
        if bad is not None:
            raise InvalidArgument(f"ids: id at position {bad} hashes to the identity (expected a non-identity point)")
        return bytes(buf)

    def blind_points(self, points: bytes, field: str = "points", *, first_index: int = 0) -> bytes:
        """P^k for each 32-byte point P, n*32 bytes in the order given.
        InvalidArgument (one line: the field, the first bad index, what was
        expected; never a point's bytes) unless every point is the canonical
        encoding of a non-identity element. `first_index`: the index of the
        first point in the whole set, when `points` is one chunk of it."""
        if len(points) % POINT_BYTES:
            raise InvalidArgument(
                f"{field}: {len(points)} bytes, so point {first_index + len(points) // POINT_BYTES} is incomplete "
                f"(expected a whole number of {POINT_BYTES}-byte ristretto255 points)"
            )
        n = len(points) // POINT_BYTES
        data = points if type(points) is bytes else bytes(points)
        src = _address(data)
        buf, out = _writable(n * POINT_BYTES)
        bad = self._raise_all(src, n, out)
        if bad is not None:
            off = POINT_BYTES * bad
            what = "the identity" if _SODIUM.is_valid_point(src + off) == 1 else "not a canonical encoding"
            raise InvalidArgument(
                f"{field}: point {first_index + bad} is {what} (expected the canonical {POINT_BYTES}-byte encoding "
                "of a non-identity ristretto255 element)"
            )
        return bytes(buf)

    def forget(self) -> None:
        """Zero the scalar and refuse later use; waits for calls in progress.
        Idempotent."""
        with self._cond:
            self._cond.wait_for(lambda: self._in_use == 0)
            if self._scalar is not None:
                _SODIUM.memzero(ctypes.addressof(self._scalar), SCALAR_BYTES)
                self._scalar = None

    def __del__(self) -> None:
        scalar = getattr(self, "_scalar", None)
        if scalar is not None:
            _SODIUM.memzero(ctypes.addressof(scalar), SCALAR_BYTES)


def random_permutation(n: int) -> np.ndarray:
    """A uniform permutation of range(n), int64, from the OS CSPRNG
    (`secrets`): the order of 128-bit random keys. Keys that tie (chance
    below n^2 / 2^129) are redrawn, so the order is exactly uniform."""
    while True:
        keys = np.frombuffer(secrets.token_bytes(16 * n), dtype=np.uint64).reshape(n, 2)
        order = np.lexsort((keys[:, 1], keys[:, 0])).astype(np.int64)
        ranked = keys[order]
        if n < 2 or not (ranked[1:] == ranked[:-1]).all(axis=1).any():
            return order


def _tags(data: bytes, field: str) -> np.ndarray:
    if len(data) % POINT_BYTES:
        raise InvalidArgument(f"{field}: {len(data)} bytes is not a whole number of {POINT_BYTES}-byte tags")
    return np.frombuffer(data, dtype=_TAG)


def match(own: bytes, peer: bytes) -> np.ndarray:
    """Indices i, ascending, of the 32-byte tags own[i] that occur in `peer`
    (all 32 bytes compared)."""
    mine, theirs = _tags(own, "own tags"), _tags(peer, "peer tags")
    if not len(mine) or not len(theirs):
        return np.zeros(0, dtype=np.int64)
    ranked = np.sort(theirs)
    at = np.searchsorted(ranked, mine)
    found = ranked[np.minimum(at, len(ranked) - 1)] == mine
    return np.flatnonzero(found).astype(np.int64)


def canonical_order(tags: bytes, indices: np.ndarray) -> np.ndarray:
    """`indices` reordered so that their tags ascend bytewise: the alignment
    order both parties derive alike."""
    idx = np.asarray(indices, dtype=np.int64)
    return idx[np.argsort(_tags(tags, "tags")[idx], kind="stable")]


def digest(tags: bytes, indices: np.ndarray) -> bytes:
    """SHA-256 over the tags at `indices` in canonical order: equal at both
    parties iff they hold the same intersection in the same order."""
    view = _tags(tags, "tags")
    return hashlib.sha256(np.ascontiguousarray(view[canonical_order(tags, indices)]).tobytes()).digest()


def check_ids(ids: Sequence[str], field: str) -> None:
    """InvalidArgument unless every id is non-empty, unique and encodable as
    UTF-8. Says how many and where the first is; never an id's value."""
    unique = set(ids)
    if "" not in unique and len(unique) == len(ids):
        _check_encodable(ids, field)
        return
    empty: list[int] = []
    duplicate: list[int] = []
    seen: set[str] = set()
    for i, x in enumerate(ids):
        if x == "":
            empty.append(i)
        elif x in seen:
            duplicate.append(i)
        else:
            seen.add(x)
    problems = []
    if empty:
        problems.append(f"{len(empty)} empty id{'s' if len(empty) > 1 else ''} (first at position {empty[0]})")
    if duplicate:
        problems.append(
            f"{len(duplicate)} duplicate id{'s' if len(duplicate) > 1 else ''} (first at position {duplicate[0]})"
        )
    raise InvalidArgument(f"{field}: " + "; ".join(problems))


def chunks(data: bytes, points: int = CHUNK_POINTS) -> Iterator[bytes]:
    """`data` (n*32 bytes) in messages of at most `points` points."""
    step = points * POINT_BYTES
    for s in range(0, len(data), step):
        yield data[s : s + step]
