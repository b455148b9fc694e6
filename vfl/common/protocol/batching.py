"""Mini-batch schedule and the batch-size leakage guard.

Both parties could expand a seed identically, but A sends the row positions
of each batch explicitly, so B never has to trust a local re-implementation.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from vfl.common.errors import InvalidArgument


@dataclass(frozen=True)
class Batch:
    epoch: int
    rows: np.ndarray  # positions in the job's ordered ids


# Decryptions B may release for one iteration's batch: the first, and one
# more if the iteration is restarted after a failure.
DECRYPTIONS_PER_ITERATION = 2


def min_batch_size(p_active: int, p_passive: int, allow_small: bool) -> int:
    """Smallest batch that keeps a party's plaintext gradients from being
    solvable for the other side's per-sample values (PROTOCOL.md, leakage).
    Each decryption hands A p_A + 1 linear equations in b_S (and B p_B in
    a_S); over the decryptions allowed per iteration, plus the loss scalar,
    they must stay fewer than the m unknowns. `allow_small` (A's request
    *and* B's consent) drops the wider 3 * max(p_A, p_B) margin."""
    floor = DECRYPTIONS_PER_ITERATION * max(p_active + 2, p_passive + 1)
    return floor if allow_small else max(floor, 3 * max(p_active, p_passive))


def coalition_feature_counts(p_active: int, p_passives: Sequence[int]) -> tuple[int, int]:
    """With k passive parties, the (p_A, p_B) that the batch guard must use:
    the equations a coalition of every party but one gets about the one left
    out. All of A's peers together see X_B^T a with p_B = sum_j p_j rows of
    equations; A with every B_l but B_j sees X_{-j}^T b_j, p_A + sum_{l != j} p_l,
    most for the B_j with the fewest features. With k = 1: (p_A, p_B)."""
    if not p_passives:
        raise InvalidArgument("passive parties: at least one")
    total = sum(p_passives)
    return p_active + total - min(p_passives), total


def check_batch_size(batch_size: int, p_active: int, p_passive: int, allow_small: bool) -> None:
    floor = min_batch_size(p_active, p_passive, allow_small)
    if batch_size < floor:
        rule = (
            f"{DECRYPTIONS_PER_ITERATION} * max(p_A + 2, p_B + 1)"
            if allow_small
            else "max(3 * max(p_A, p_B), 2 * max(p_A + 2, p_B + 1)) (allow_small_batch, with B's consent, lowers it)"
        )
        raise InvalidArgument(
            f"config.batch_size: expected at least {floor} = {rule} with p_A={p_active}, "
            f"p_B={p_passive}, got {batch_size}"
        )


class BatchSchedule(Sequence[Batch]):
    """Shuffled batches per epoch, computed when asked for: memory is one
    epoch's order, not epochs x rows, whatever the number of epochs. Each
    epoch's order comes from its own generator, seeded by (seed, epoch), so
    any batch can be had without replaying the epochs before it. A last
    partial batch under `min_batch` is merged into the one before it rather
    than dropped or sent alone."""

    def __init__(self, n_rows: int, batch_size: int, epochs: int, seed: int, min_batch: int, limit: int = 0) -> None:
        if n_rows < min_batch:
            raise InvalidArgument(f"train_ids: expected at least {min_batch} training rows, got {n_rows}")
        self.n_rows, self.batch_size, self.epochs, self.seed = n_rows, batch_size, epochs, seed
        chunks = -(-n_rows // batch_size)
        last = n_rows - (chunks - 1) * batch_size
        self._merge_tail = chunks > 1 and last < min_batch
        self.per_epoch = chunks - 1 if self._merge_tail else chunks
        total = self.per_epoch * epochs
        self._len = min(total, limit) if limit else total
        self._cache: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._len

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if self._cache is None or self._cache[0] != epoch:
                self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows))
            return self._cache[1]

    @overload
    def __getitem__(self, index: int) -> Batch: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Batch]: ...

    def __getitem__(self, index: int | slice) -> Batch | Sequence[Batch]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("batch index out of range")
        epoch, k = divmod(index, self.per_epoch)
        order = self._order(epoch)
        start = k * self.batch_size
        end = self.n_rows if (self._merge_tail and k == self.per_epoch - 1) else start + self.batch_size
        return Batch(epoch, np.sort(order[start:end]))


def batch_schedule(
    n_rows: int, batch_size: int, epochs: int, seed: int, min_batch: int, limit: int = 0
) -> BatchSchedule:
    """The job's batches (the first `limit` of them when limit > 0)."""
    return BatchSchedule(n_rows, batch_size, epochs, seed, min_batch, limit)
