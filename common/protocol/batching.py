"""Mini-batch schedule and the batch-size leakage guard.

Both parties could expand a seed identically, but A sends the row positions
of each batch explicitly, so B never has to trust a local re-implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import InvalidArgument


@dataclass(frozen=True)
class Batch:
    epoch: int
    rows: np.ndarray  # positions in the job's ordered ids


def min_batch_size(p_active: int, p_passive: int, allow_small: bool) -> int:
    """Smallest batch that keeps a party's plaintext gradient from being
    solvable for the other side's per-sample values (PROTOCOL.md, leakage)."""
    p = max(p_active, p_passive)
    return p + 1 if allow_small else 3 * p


def check_batch_size(batch_size: int, p_active: int, p_passive: int, allow_small: bool) -> None:
    floor = min_batch_size(p_active, p_passive, allow_small)
    if batch_size < floor:
        rule = "max(p_A, p_B) + 1" if allow_small else "3 * max(p_A, p_B) (allow_small_batch lowers it)"
        raise InvalidArgument(
            f"config.batch_size: expected at least {floor} = {rule} with p_A={p_active}, "
            f"p_B={p_passive}, got {batch_size}"
        )


def batch_schedule(n_rows: int, batch_size: int, epochs: int, seed: int, min_batch: int) -> list[Batch]:
    """Shuffled batches per epoch. A last partial batch under `min_batch` is
    merged into the one before it rather than dropped or sent alone."""
    if n_rows < min_batch:
        raise InvalidArgument(f"train_ids: expected at least {min_batch} training rows, got {n_rows}")
    rng = np.random.default_rng(seed)
    out: list[Batch] = []
    for epoch in range(epochs):
        order = rng.permutation(n_rows)
        chunks = [order[s : s + batch_size] for s in range(0, n_rows, batch_size)]
        if len(chunks) > 1 and len(chunks[-1]) < min_batch:
            tail = chunks.pop()
            chunks[-1] = np.concatenate([chunks[-1], tail])
        out.extend(Batch(epoch, np.sort(c)) for c in chunks)
    return out
