"""ristretto255 primitives of the private set intersection (libsodium via
pysodium). First version, to be replaced by the measured one."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pysodium  # type: ignore[import-untyped]

from common.errors import InvalidArgument

POINT_BYTES = 32
DOMAIN = b"vfl-psi-v1"
CHUNK_POINTS = 32768
_PREFIX = len(DOMAIN).to_bytes(1, "big") + DOMAIN


def _hash_one(x: str) -> bytes:
    return bytes(pysodium.crypto_core_ristretto255_from_hash(hashlib.sha512(_PREFIX + x.encode()).digest()))


def hash_to_group(ids: Sequence[str]) -> bytes:
    return b"".join(_hash_one(x) for x in ids)


class PsiSecret:
    def __init__(self, workers: int | None = None) -> None:
        self._k: bytes | None = bytes(pysodium.crypto_core_ristretto255_scalar_random())
        self._workers = workers or os.cpu_count() or 1

    def __repr__(self) -> str:
        return "PsiSecret(<secret>)"

    def __reduce__(self) -> object:
        raise TypeError("a PsiSecret is never serialised")

    def _key(self) -> bytes:
        if self._k is None:
            raise RuntimeError("PsiSecret: used after forget()")
        return self._k

    def _mult(self, points: list[bytes], field: str, offset: int) -> bytes:
        k = self._key()
        out = []
        for i, p in enumerate(points):
            try:
                out.append(bytes(pysodium.crypto_scalarmult_ristretto255(k, p)))
            except Exception:
                raise InvalidArgument(
                    f"{field}: point {offset + i} is not a valid ristretto255 element (expected a canonical "
                    "32-byte encoding of a non-identity element)"
                ) from None
        return b"".join(out)

    def _parallel(self, points: list[bytes], field: str) -> bytes:
        if len(points) < 256 or self._workers == 1:
            return self._mult(points, field, 0)
        step = -(-len(points) // self._workers)
        with ThreadPoolExecutor(self._workers) as pool:
            parts = [pool.submit(self._mult, points[s : s + step], field, s) for s in range(0, len(points), step)]
            return b"".join(p.result() for p in parts)

    def blind_ids(self, ids: Sequence[str]) -> bytes:
        self._key()
        return self._parallel([_hash_one(x) for x in ids], "ids")

    def blind_points(self, points: bytes, field: str = "points") -> bytes:
        if len(points) % POINT_BYTES:
            raise InvalidArgument(f"{field}: {len(points)} bytes is not a whole number of {POINT_BYTES}-byte points")
        pts = [points[i : i + POINT_BYTES] for i in range(0, len(points), POINT_BYTES)]
        return self._parallel(pts, field)

    def forget(self) -> None:
        self._k = None


def random_permutation(n: int) -> np.ndarray:
    return np.random.default_rng(int.from_bytes(secrets.token_bytes(32), "big")).permutation(n).astype(np.int64)


def _view(tags: bytes) -> np.ndarray:
    return np.frombuffer(tags, dtype=np.dtype((np.void, POINT_BYTES)))


def match(own: bytes, peer: bytes) -> np.ndarray:
    peer_set = {peer[i : i + POINT_BYTES] for i in range(0, len(peer), POINT_BYTES)}
    n = len(own) // POINT_BYTES
    return np.asarray(
        [i for i in range(n) if own[i * POINT_BYTES : (i + 1) * POINT_BYTES] in peer_set], dtype=np.int64
    )


def canonical_order(tags: bytes, indices: np.ndarray) -> np.ndarray:
    keys = [tags[int(i) * POINT_BYTES : (int(i) + 1) * POINT_BYTES] for i in indices]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return np.asarray(indices, dtype=np.int64)[np.asarray(order, dtype=np.int64)] if order else np.zeros(0, np.int64)


def digest(tags: bytes, indices: np.ndarray) -> bytes:
    h = hashlib.sha256()
    for i in canonical_order(tags, indices):
        h.update(tags[int(i) * POINT_BYTES : (int(i) + 1) * POINT_BYTES])
    return h.digest()


def chunks(data: bytes, points: int = CHUNK_POINTS) -> Iterator[bytes]:
    step = points * POINT_BYTES
    for s in range(0, len(data), step):
        yield data[s : s + step]
