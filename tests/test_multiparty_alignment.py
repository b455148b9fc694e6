"""With k passive parties, A runs one DH-PSI with each (the pure steps of
vfl/common/protocol/alignment.py, both sides in this process) and keeps the
ids all of them hold: the result equals the plain intersection of every
party's set, and each party's positions point at the same ids in its own
alignment."""

from __future__ import annotations

import random

from vfl.common import psi
from vfl.common.protocol.alignment import blind_own_ids, blind_peer_points, common_rows, intersect, shuffle_own_ids


def pairwise_alignment(active_ids: list[str], passive_ids: list[str]) -> tuple[list[str], list[str]]:
    """One two-party PSI: each side's ids in the intersection, canonical order."""
    a_secret, b_secret = psi.PsiSecret(), psi.PsiSecret()
    a_shuffle, b_shuffle = shuffle_own_ids(len(active_ids)), shuffle_own_ids(len(passive_ids))
    a_points = b"".join(blind_own_ids(a_secret, active_ids, a_shuffle))
    b_points = b"".join(blind_own_ids(b_secret, passive_ids, b_shuffle))
    a_tags = blind_peer_points(b_secret, a_points, "a")  # B raises A's points, in A's order
    b_tags = blind_peer_points(a_secret, b_points, "b")
    a_side = intersect(a_shuffle, a_tags, b_tags)
    b_side = intersect(b_shuffle, b_tags, a_tags)
    assert a_side.digest == b_side.digest
    return [active_ids[i] for i in a_side.rows], [passive_ids[i] for i in b_side.rows]


def test_three_passive_parties_align_on_the_common_ids() -> None:
    rng = random.Random(5)
    universe = [f"cust-{i}" for i in range(400)]
    active = rng.sample(universe, 300)
    passives = {f"b{j}": rng.sample(universe, 250) for j in (1, 2, 3)}
    at_a, at_b = {}, {}
    for name, ids in passives.items():
        at_a[name], at_b[name] = pairwise_alignment(active, ids)
        assert at_a[name] == at_b[name]  # both sides derive the same canonical order
    rows = common_rows(at_a)
    expected = set(active).intersection(*passives.values())
    assert set(rows.ids) == expected and len(rows.ids) == len(expected) > 0
    for name in passives:
        # B_j's positions in its own stored alignment name the same ids, in the job's order.
        assert [at_b[name][p] for p in rows.positions[name]] == rows.ids
