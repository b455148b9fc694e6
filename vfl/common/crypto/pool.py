"""Randomness for encryption, precomputed while the party is idle.

An encryption is g^m * h^r: g^m for a residual is a few table lookups, h^r is
most of the cost, and a hiding randomiser (r^n for r uniform, see
`fast_backend`) is a full exponentiation. A `RandomnessPool` keeps such
values ready; one background
thread per process fills every pool, but only while the party is idle
(between requests at B, waiting on B at A), so that it never competes with
protocol work for the GIL. Each value is used once; an empty pool falls back
to computing one inline.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from gmpy2 import mpz

P = ParamSpec("P")
T = TypeVar("T")


class IdleGate:
    """Counts sections of protocol work; the pool filler runs only when none
    is in progress. A thread inside a work section may declare itself idle
    while it blocks (A, waiting on B)."""

    def __init__(self) -> None:
        self._busy = 0
        self._cond = threading.Condition()
        self._local = threading.local()

    @contextmanager
    def busy(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        if depth == 0:
            with self._cond:
                self._busy += 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    @contextmanager
    def idle(self) -> Iterator[None]:
        """Inside a busy section: let the filler run while this thread waits."""
        if getattr(self._local, "depth", 0) == 0:
            yield
            return
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._busy += 1

    def working(self, fn: Callable[P, T]) -> Callable[P, T]:
        """Decorator: the call is protocol work."""

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            with self.busy():
                return fn(*args, **kwargs)

        return wrapper

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)

    @property
    def is_idle(self) -> bool:
        return self._busy == 0


GATE = IdleGate()


class RandomnessPool:
    """Precomputed randomisers: each value is `draw()`, fresh from the OS
    CSPRNG (e.g. h^r for a uniform r, or r^n mod n^2 for r uniform in Z_n^*).
    Capacity grows with demand up to `max_capacity`."""

    def __init__(self, draw: Callable[[], mpz], capacity: int = 1024, max_capacity: int = 1 << 20) -> None:
        self._draw = draw
        self.max_capacity = max(capacity, max_capacity)
        self.capacity = capacity
        self._values: deque[mpz] = deque()

    def take(self) -> mpz:
        try:
            return self._values.popleft()
        except IndexError:
            return self._draw()

    def demand(self, n: int) -> None:
        """A request of n values: keep room for two such requests."""
        self.capacity = min(self.max_capacity, max(self.capacity, 2 * n))

    @property
    def wanting(self) -> bool:
        return len(self._values) < self.capacity

    @property
    def available(self) -> int:
        return len(self._values)

    def fill_one(self) -> None:
        self._values.append(self._draw())


def random_power_pool(power: Callable[[int], mpz], bits: int, capacity: int = 1024) -> RandomnessPool:
    """A pool of power(r) for r uniform with `bits` bits (h^r from a table)."""
    return RandomnessPool(lambda: power(secrets.randbits(bits)), capacity)


class _Filler:
    def __init__(self) -> None:
        self._pools: list[RandomnessPool] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def register(self, pool: RandomnessPool) -> None:
        with self._lock:
            self._pools.append(pool)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="randomness-pool", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            if not GATE.wait_idle(timeout=1.0):
                continue
            with self._lock:
                wanting = [p for p in self._pools if p.wanting]
            if not wanting:
                time.sleep(0.01)
                continue
            for pool in wanting:
                if not GATE.is_idle:
                    break
                pool.fill_one()
                # Hand the GIL to a thread that has work now.
                time.sleep(0)


FILLER = _Filler()
