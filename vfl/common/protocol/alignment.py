"""The "Alignment" section of PROTOCOL.md: a Diffie-Hellman private set
intersection, one function per step. Pure: ids and 32-byte group elements
in and out, no gRPC (vfl/services/*/alignment.py move the bytes).

Each party P holds a fresh secret scalar k_P for this alignment only, and:
1. blinds its own ids, H(x)^k_P, in a shuffled order (`shuffle_own_ids`),
   and sends them chunk by chunk as it computes them (`blind_own_ids`);
2. raises the other party's points to its own scalar, in the order received
   (`blind_peer_points`): both orders of exponentiation give the same tag
   H(x)^(k_A k_B);
3. finds which of its own ids have a tag the other party also has, and puts
   them in the canonical order, ascending tag bytes, which both parties
   derive alike (`intersect`).
The shuffle hides the order of each party's list; the tags are pseudorandom
to anyone who holds at most one of the two scalars (DDH in the random-oracle
model; docs/CRYPTO.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vfl.common import psi
from vfl.common.errors import InvalidArgument


@dataclass(frozen=True)
class Shuffle:
    """The order a party sends its own ids in: the i-th point it sends is
    H(ids[order[i]])^k. It keeps only this, not the points it sent."""

    order: np.ndarray

    def __len__(self) -> int:
        return len(self.order)


@dataclass(frozen=True)
class Intersection:
    """Indices into the party's own id list, in the canonical order, and the
    digest of their tags (both parties must find the same)."""

    rows: np.ndarray
    digest: bytes

    def __len__(self) -> int:
        return len(self.rows)


def shuffle_own_ids(n: int) -> Shuffle:
    """Step 1, first: a fresh uniform order (the sent order would otherwise be
    the party's list order)."""
    return Shuffle(psi.random_permutation(n))


def blind_own_ids(
    secret: psi.PsiSecret, ids: Sequence[str], shuffle: Shuffle, chunk_points: int = psi.CHUNK_POINTS
) -> Iterator[bytes]:
    """Step 1, each party on its own ids: hash to the group and raise to its
    own scalar, in the shuffled order, one message's worth at a time, as the
    stream sends them: the whole blinded set is never held, and the peer
    works on one chunk while this party computes the next."""
    for lo in range(0, len(shuffle), chunk_points):
        yield secret.blind_ids([ids[i] for i in shuffle.order[lo : lo + chunk_points]])


def blind_peer_points(secret: psi.PsiSecret, points: bytes, field: str, first_index: int = 0) -> bytes:
    """Step 2, each party on the other's points: raise each to its own scalar,
    keeping their order (the sender alone can map them back). `first_index`:
    where this chunk starts in the whole set (for the error's index)."""
    return secret.blind_points(points, field, first_index=first_index)


def intersect(own: Shuffle, own_tags: bytes, peer_tags: bytes) -> Intersection:
    """Step 3: `own_tags` are the party's own points after both scalars, in
    the order it sent them; `peer_tags` the other party's, likewise. The
    rows are the party's own indices whose tag the other party holds too."""
    if len(own_tags) != len(own) * psi.POINT_BYTES:
        raise InvalidArgument(
            f"tags: expected {len(own)} tags of {psi.POINT_BYTES} bytes for this party's points, "
            f"got {len(own_tags)} bytes"
        )
    shuffled = psi.canonical_order(own_tags, psi.match(own_tags, peer_tags))
    return Intersection(own.order[shuffled], psi.digest(own_tags, shuffled))


@dataclass(frozen=True)
class CommonRows:
    """With k passive parties (docs/PARTIES.md): the ids every party holds,
    in A's order, and for each passive party the positions of those ids in
    its own pairwise alignment with A (what a job sends it, never an id)."""

    ids: list[str]
    positions: dict[str, list[int]]


def common_rows(alignments: dict[str, Sequence[str]]) -> CommonRows:
    """A, after one two-party PSI with each passive party: `alignments` maps
    each party's name to the ids of its intersection with A, in that
    alignment's canonical order (A's side). Each B_j learns its own
    intersection with A, not the common one; the job's rows then tell it which
    of its aligned positions every other party holds too (SECURITY.md)."""
    if not alignments:
        raise InvalidArgument("alignments: at least one passive party")
    names = sorted(alignments)
    common = set(alignments[names[0]]).intersection(*(alignments[n] for n in names[1:]))
    ordered = [x for x in alignments[names[0]] if x in common]
    positions = {}
    for name in names:
        index = {x: i for i, x in enumerate(alignments[name])}
        positions[name] = [index[x] for x in ordered]
    return CommonRows(ordered, positions)
