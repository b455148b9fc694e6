"""Where a party's time and bytes go, for the job metrics in its model shard
and for `make bench`.

One clock per process (each party is its own process). Phases: encrypt,
matvec (X^T [[v]]), mask (fresh mask encryptions and homomorphic adds),
decrypt, serialise (packing and unpacking vectors), rpc_wait (A: time its
training loop spends inside the step calls to B, which includes B's work and
the network), rpc_background (A: calls that overlap its own work: B's step 5
and the loss share), handler (B: time inside any PartyService handler) and
handler_steps (B: inside the step 1-2 and 3-4 handlers, so that A's rpc_wait
minus B's handler_steps estimates the network and the assistant's relay). Time in a phase is summed over threads, so
overlapped work can add up to more than the wall time.
"""

from __future__ import annotations

import resource
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from vfl.common.crypto.backend import CipherVector, HEBackend, PrivateKey, PublicKey


class PhaseClock:
    def __init__(self) -> None:
        self._seconds: defaultdict[str, float] = defaultdict(float)
        self._bytes_sent = 0
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._seconds[name] += elapsed

    def add_bytes_sent(self, n: int) -> None:
        with self._lock:
            self._bytes_sent += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"phases_s": dict(self._seconds), "bytes_sent": self._bytes_sent}


CLOCK = PhaseClock()


def since(start: dict[str, Any]) -> dict[str, Any]:
    """Phases and bytes since `start` (a snapshot), plus this process's peak
    resident memory."""
    now = CLOCK.snapshot()
    phases = {k: round(v - start["phases_s"].get(k, 0.0), 6) for k, v in now["phases_s"].items()}
    return {
        "phases_s": phases,
        "bytes_sent": now["bytes_sent"] - start["bytes_sent"],
        # ru_maxrss is in KiB on Linux.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


class TimedBackend(HEBackend):
    """Wraps a backend and books each call to its phase on CLOCK."""

    def __init__(self, inner: HEBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.own_scheme = inner.own_scheme
        self.schemes = inner.schemes

    def generate_keypair(self, bits: int) -> PrivateKey:
        return self.inner.generate_keypair(bits)

    def prepare(self, key: PublicKey | PrivateKey) -> None:
        self.inner.prepare(key)

    def set_workers(self, workers: int) -> None:
        self.inner.set_workers(workers)

    def encrypt(self, key: PublicKey, plaintexts: Sequence[int], hiding: bool = False) -> CipherVector:
        with CLOCK.phase("mask" if hiding else "encrypt"):
            return self.inner.encrypt(key, plaintexts, hiding=hiding)

    def decrypt(self, key: PrivateKey, ciphers: CipherVector) -> list[int]:
        with CLOCK.phase("decrypt"):
            return self.inner.decrypt(key, ciphers)

    def add(self, a: CipherVector, b: CipherVector) -> CipherVector:
        with CLOCK.phase("mask"):
            return self.inner.add(a, b)

    def matvec(self, matrix: np.ndarray, ciphers: CipherVector) -> CipherVector:
        with CLOCK.phase("matvec"):
            return self.inner.matvec(matrix, ciphers)

    def rerandomise(self, ciphers: CipherVector) -> CipherVector:
        with CLOCK.phase("mask"):
            return self.inner.rerandomise(ciphers)
