"""Exponentiation kernels over gmpy2 for the fast backends.

- `FixedBaseTable`: base^e for many exponents e of one base (encryption's
  g^m and h^r), by a table of base^(d * 2^(w j)): one multiplication per
  w-bit window of e, no squarings.
- `matvec_powers`: prod_i c_i^(M[j, i]) for every row j of a signed integer
  matrix, as a multi-exponentiation instead of one exponentiation per entry.
  Two algorithms, chosen per call by an operation count: Straus (one table of
  small powers per base, shared by all rows; best for short vectors) and
  Pippenger's bucket method (per row, best when a row has many bases).
  Negative coefficients go to a second accumulator that is inverted once per
  row, so no exponent is near the group order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gmpy2
import numpy as np
from gmpy2 import mpz

# Coefficients beyond this go through the generic path (one powmod each).
_INT64_SAFE = 1 << 62


class FixedBaseTable:
    """base^e mod m for e >= 0; rows[j][d] = base^(d * 2^(w j)), grown on demand."""

    def __init__(self, base: int, modulus: int, window: int = 8) -> None:
        self.modulus = mpz(modulus)
        self.window = window
        self._digit_mask = (1 << window) - 1
        self._rows: list[list[mpz]] = []
        self._next = mpz(base) % self.modulus  # base^(2^(w * len(rows)))
        self._lock = threading.Lock()

    def _grow(self, windows: int) -> None:
        with self._lock:
            m = self.modulus
            while len(self._rows) < windows:
                b = self._next
                row = [mpz(1), b]
                acc = b
                for _ in range(2, 1 << self.window):
                    acc = acc * b % m
                    row.append(acc)
                self._rows.append(row)
                self._next = acc * b % m

    def pow(self, e: int) -> mpz:
        if e < 0:
            raise ValueError("FixedBaseTable.pow: negative exponent")
        w = self.window
        windows = (e.bit_length() + w - 1) // w
        if windows > len(self._rows):
            self._grow(windows)
        m, rows, mask = self.modulus, self._rows, self._digit_mask
        acc = mpz(1)
        j = 0
        while e:
            d = e & mask
            if d:
                acc = acc * rows[j][d] % m
            e >>= w
            j += 1
        return acc


@dataclass(frozen=True)
class Plan:
    algorithm: str  # "straus" or "bucket"
    window: int
    cost: float  # estimated modular multiplications


def plan_matvec(n_bases: int, row_bits: Sequence[int]) -> Plan:
    """The cheaper algorithm and window for these sizes, by multiplication count
    (a squaring costs about a multiplication)."""
    best = Plan("straus", 1, float("inf"))
    live = [b for b in row_bits if b > 0]
    for w in range(1, 9):
        cost = n_bases * ((1 << w) - 2) + sum(2 * b + n_bases * -(-b // w) * (1 - 2.0**-w) for b in live)
        if cost < best.cost:
            best = Plan("straus", w, cost)
    for c in range(1, 15):
        cost = sum(-(-b // c) * (n_bases + 4 * (1 << c)) + 2 * b for b in live)
        if cost < best.cost:
            best = Plan("bucket", c, cost)
    return best


def _digits(abs_row: np.ndarray, window: int, windows: int) -> list[list[int]]:
    mask = (1 << window) - 1
    return [((abs_row >> (window * k)) & mask).tolist() for k in range(windows)]


def _finish(pos: mpz, neg: mpz, m: mpz) -> mpz:
    return pos if neg == 1 else pos * gmpy2.invert(neg, m) % m


def _straus(bases: list[mpz], absm: np.ndarray, negm: np.ndarray, bits: list[int], w: int, m: mpz) -> list[mpz]:
    used = np.flatnonzero(absm.any(axis=0)).tolist()
    tables: dict[int, list[mpz]] = {}
    for i in used:
        b = bases[i]
        row = [mpz(1), b]
        for _ in range(2, 1 << w):
            row.append(row[-1] * b % m)
        tables[i] = row
    out = []
    square = 1 << w
    for j, bj in enumerate(bits):
        pos = neg = mpz(1)
        if bj:
            windows = -(-bj // w)
            digits = _digits(absm[j], w, windows)
            is_neg = negm[j].tolist()
            nz = np.flatnonzero(absm[j]).tolist()
            for k in range(windows - 1, -1, -1):
                if pos != 1:
                    pos = gmpy2.powmod(pos, square, m)
                if neg != 1:
                    neg = gmpy2.powmod(neg, square, m)
                dk = digits[k]
                for i in nz:
                    d = dk[i]
                    if d:
                        if is_neg[i]:
                            neg = neg * tables[i][d] % m
                        else:
                            pos = pos * tables[i][d] % m
        out.append(_finish(pos, neg, m))
    return out


def _bucket_sum(buckets: list[mpz | None], m: mpz) -> mpz:
    """prod_d buckets[d]^d with 2 multiplications per bucket (running products)."""
    running: mpz | None = None
    total = mpz(1)
    for d in range(len(buckets) - 1, 0, -1):
        b = buckets[d]
        if b is not None:
            running = b if running is None else running * b % m
        if running is not None:
            total = total * running % m
    return total


def _bucket(bases: list[mpz], absm: np.ndarray, negm: np.ndarray, bits: list[int], c: int, m: mpz) -> list[mpz]:
    out = []
    square = 1 << c
    for j, bj in enumerate(bits):
        pos = neg = mpz(1)
        if bj:
            windows = -(-bj // c)
            digits = _digits(absm[j], c, windows)
            is_neg = negm[j].tolist()
            nz = np.flatnonzero(absm[j]).tolist()
            for k in range(windows - 1, -1, -1):
                if pos != 1:
                    pos = gmpy2.powmod(pos, square, m)
                if neg != 1:
                    neg = gmpy2.powmod(neg, square, m)
                pb: list[mpz | None] = [None] * square
                nb: list[mpz | None] = [None] * square
                dk = digits[k]
                for i in nz:
                    d = dk[i]
                    if d:
                        bucket = nb if is_neg[i] else pb
                        cur = bucket[d]
                        bucket[d] = bases[i] if cur is None else cur * bases[i] % m
                pos = pos * _bucket_sum(pb, m) % m
                neg = neg * _bucket_sum(nb, m) % m
        out.append(_finish(pos, neg, m))
    return out


def _generic(bases: list[mpz], matrix: np.ndarray, m: mpz) -> list[mpz]:
    """One powmod per entry, for coefficients too large for int64 digits."""
    out = []
    inverses: list[mpz] | None = None
    for row in matrix:
        acc = mpz(1)
        for i, coef in enumerate(row):
            e = int(coef)
            if e > 0:
                acc = acc * gmpy2.powmod(bases[i], e, m) % m
            elif e < 0:
                if inverses is None:
                    inverses = [gmpy2.invert(b, m) for b in bases]
                acc = acc * gmpy2.powmod(inverses[i], -e, m) % m
        out.append(acc)
    return out


def matvec_powers(bases: Sequence[int], matrix: np.ndarray, modulus: int) -> list[mpz]:
    """[prod_i bases[i]^matrix[j, i] mod modulus for each row j]."""
    m = mpz(modulus)
    bs = [mpz(b) for b in bases]
    mat = np.asarray(matrix)
    if mat.ndim != 2 or mat.shape[1] != len(bs):
        raise ValueError(f"matvec: matrix of shape {mat.shape} does not match {len(bs)} ciphertexts")
    if mat.dtype == object:
        if mat.size and max(abs(int(v)) for v in mat.ravel()) >= _INT64_SAFE:
            return _generic(bs, mat, m)
        mat = mat.astype(np.int64)
    elif not np.issubdtype(mat.dtype, np.integer):
        raise ValueError("matvec: expected an integer matrix")
    mat = mat.astype(np.int64, copy=False)
    absm = np.abs(mat)
    negm = mat < 0
    bits = [int(v).bit_length() for v in (absm.max(axis=1) if mat.shape[1] else np.zeros(mat.shape[0], np.int64))]
    plan = plan_matvec(len(bs), bits)
    if plan.algorithm == "straus":
        return _straus(bs, absm, negm, bits, plan.window, m)
    return _bucket(bs, absm, negm, bits, plan.window, m)


class ParallelMatvec:
    """Large products split by rows across a process pool sized to the cores.

    Worth it only when the product is large (seconds, not milliseconds) and
    the party has cores to spare; small products stay in-process, where they
    cost no pickling. Workers are spawned, not forked, so that they inherit
    no gRPC state.
    """

    def __init__(self, workers: int, min_cost: float = 2e5) -> None:
        self.workers = workers
        self.min_cost = min_cost
        self._pool: Any = None
        self._lock = threading.Lock()

    def _executor(self) -> Any:
        with self._lock:
            if self._pool is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
                # Start every worker now: the pool spawns them on demand, and a
                # worker spawned mid-product costs more than it saves.
                for f in [pool.submit(time.sleep, 0.05) for _ in range(self.workers)]:
                    f.result()
                self._pool = pool
            return self._pool

    def __call__(self, bases: Sequence[int], matrix: np.ndarray, modulus: int) -> list[mpz]:
        mat = np.asarray(matrix)
        rows = mat.shape[0] if mat.ndim == 2 else 0
        if self.workers <= 1 or rows < 2 or mat.dtype == object:
            return matvec_powers(bases, matrix, modulus)
        bits = [int(v).bit_length() for v in np.abs(mat.astype(np.int64)).max(axis=1)] if mat.shape[1] else []
        if plan_matvec(len(bases), bits).cost < self.min_cost:
            return matvec_powers(bases, matrix, modulus)
        plain = [int(b) for b in bases]
        parts = np.array_split(np.arange(rows), min(self.workers, rows))
        jobs = [self._executor().submit(matvec_powers, plain, mat[idx], modulus) for idx in parts if idx.size]
        return [c for job in jobs for c in job.result()]
