"""vfl/common/psi.py: the two-party DH-PSI computed in-process against plain set
intersection, the group law it relies on, its input checks, and the exact
(32-byte) tag comparison, with a planted 8-byte-prefix bug it must catch."""

from __future__ import annotations

import collections
import copy
import hashlib
import pickle
from collections.abc import Callable, Sequence

import numpy as np
import pysodium
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vfl.common import psi
from vfl.common.errors import InvalidArgument

P = psi.POINT_BYTES
MatchFn = Callable[[bytes, bytes], np.ndarray]

# Any unicode but lone surrogates (not UTF-8) and NUL: non-BMP, combining marks included.
ID_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
IDS = st.one_of(
    st.text(ID_CHARS, min_size=1, max_size=12),
    st.text(ID_CHARS, min_size=1000, max_size=1000),
    st.sampled_from(["e\u0301", "\u00e9", "\U0001f600", "\U00010348x", "a" * 1000, " ", "0"]),
)
SETS = st.sets(IDS, max_size=12)


def _points(data: bytes) -> list[bytes]:
    return [data[i : i + P] for i in range(0, len(data), P)]


def _party_view(
    ids: list[str], order: np.ndarray, own_tags: bytes, peer_tags: bytes, match: MatchFn
) -> tuple[list[str], bytes]:
    """One party's result: its ids in the intersection, canonical order, and the digest."""
    rows = psi.canonical_order(own_tags, match(own_tags, peer_tags))
    return [ids[int(order[i])] for i in rows], psi.digest(own_tags, rows)


def run_psi(
    a: Sequence[str], b: Sequence[str], match: MatchFn = psi.match
) -> tuple[list[str], bytes, list[str], bytes]:
    """Both parties' computations, shuffles included, as the services run them."""
    a, b = list(a), list(b)
    ka, kb = psi.PsiSecret(workers=1), psi.PsiSecret(workers=1)
    order_a, order_b = psi.random_permutation(len(a)), psi.random_permutation(len(b))
    sent_a = ka.blind_ids([a[i] for i in order_a])
    sent_b = kb.blind_ids([b[i] for i in order_b])
    tags_a = kb.blind_points(sent_a, "active points")  # B raises A's points
    tags_b = ka.blind_points(sent_b, "passive points")  # A raises B's points
    ka.forget()
    kb.forget()
    ids_a, digest_a = _party_view(a, order_a, tags_a, tags_b, match)
    ids_b, digest_b = _party_view(b, order_b, tags_b, tags_a, match)
    return ids_a, digest_a, ids_b, digest_b


def check_against_sets(a: Sequence[str], b: Sequence[str], match: MatchFn = psi.match) -> None:
    ids_a, digest_a, ids_b, digest_b = run_psi(a, b, match)
    expected = set(a) & set(b)
    assert set(ids_a) == expected and len(ids_a) == len(expected)
    assert ids_a == ids_b  # the same canonical order at both parties
    assert digest_a == digest_b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(common=SETS, only_a=SETS, only_b=SETS, shape=st.sampled_from(["overlap", "disjoint", "identical", "empty"]))
@example(common={"x"}, only_a=set(), only_b=set(), shape="identical")
@example(common=set(), only_a=set(), only_b=set(), shape="empty")
def test_intersection_equals_set_intersection(common: set[str], only_a: set[str], only_b: set[str], shape: str) -> None:
    only_b = only_b - only_a - common
    only_a = only_a - common
    if shape == "disjoint":
        a, b = only_a, only_b
    elif shape == "identical":
        a = b = common | only_a
    elif shape == "empty":
        a, b = set(), common | only_b
    else:
        a, b = common | only_a, common | only_b
    check_against_sets(sorted(a), sorted(b))


def test_intersection_over_the_thread_split() -> None:
    """Sizes above the parallel threshold, 50 % overlap, two workers."""
    a = [f"user-{i}" for i in range(3000)]
    b = [f"user-{i}" for i in range(1500, 4500)]
    ka, kb = psi.PsiSecret(workers=2), psi.PsiSecret(workers=2)
    tags_a = kb.blind_points(ka.blind_ids(a))
    tags_b = ka.blind_points(kb.blind_ids(b))
    rows_a = psi.canonical_order(tags_a, psi.match(tags_a, tags_b))
    rows_b = psi.canonical_order(tags_b, psi.match(tags_b, tags_a))
    assert [a[i] for i in rows_a] == [b[i] for i in rows_b]
    assert {a[i] for i in rows_a} == set(a) & set(b)


def test_workers_do_not_change_the_result() -> None:
    ids = [f"id-{i}" for i in range(1500)]
    assert psi.hash_to_group(ids, workers=1) == psi.hash_to_group(ids, workers=3)
    k = psi.PsiSecret(workers=1)
    one = k.blind_ids(ids)
    k.workers = 3
    assert k.blind_ids(ids) == one
    assert k.blind_points(psi.hash_to_group(ids)) == one


# --- the group law and the hash --------------------------------------------------


def test_hash_is_the_documented_encoding() -> None:
    ids = ["alice", "\U0001f600", "e\u0301", "x" * 1000]
    prefix = b"\x0avfl-psi-v1"
    assert prefix == bytes([len(psi.DOMAIN)]) + psi.DOMAIN
    expected = b"".join(
        bytes(pysodium.crypto_core_ristretto255_from_hash(hashlib.sha512(prefix + x.encode("utf-8")).digest()))
        for x in ids
    )
    assert psi.hash_to_group(ids) == expected


def test_exponents_commute() -> None:
    ids = [f"id-{i}" for i in range(50)]
    ka, kb = psi.PsiSecret(), psi.PsiSecret()
    ab = kb.blind_points(ka.blind_ids(ids))
    ba = ka.blind_points(kb.blind_ids(ids))
    assert ab == ba
    assert len(set(_points(ab))) == len(ids)


def test_another_scalar_gives_other_tags() -> None:
    ids = [f"id-{i}" for i in range(50)]
    k1, k2 = psi.PsiSecret(), psi.PsiSecret()
    assert not set(_points(k1.blind_ids(ids))) & set(_points(k2.blind_ids(ids)))
    assert not set(_points(k1.blind_ids(ids))) & set(_points(psi.hash_to_group(ids)))


# --- bad input -------------------------------------------------------------------

GOOD = psi.hash_to_group([f"p{i}" for i in range(1200)])


@pytest.mark.parametrize(
    ("bad", "at", "what"),
    [(b"\xff" * 32, 700, "not a canonical encoding"), (bytes(32), 700, "the identity"), (bytes(32), 3, "the identity")],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_point_named_by_field_and_first_index(bad: bytes, at: int, what: str, workers: int) -> None:
    points = bytearray(GOOD)
    points[at * P : (at + 1) * P] = bad
    points[1000 * P : 1001 * P] = b"\xff" * 32  # a later bad point, in the other thread's range
    with pytest.raises(InvalidArgument) as err:
        psi.PsiSecret(workers).blind_points(bytes(points), "passive points")
    message = str(err.value)
    assert message.startswith(f"passive points: point {at} is {what} ")
    assert "\n" not in message and bad.hex() not in message


def test_wrong_length_named() -> None:
    with pytest.raises(InvalidArgument, match=r"^tags: 65 bytes, so point 2 is incomplete \(expected a whole number"):
        psi.PsiSecret().blind_points(GOOD[:65], "tags")
    assert psi.PsiSecret().blind_points(b"") == b""


def test_chunk_offset_in_the_index() -> None:
    points = bytearray(GOOD[: 10 * P])
    points[4 * P : 5 * P] = bytes(32)
    with pytest.raises(InvalidArgument, match=r"^points: point 32772 is the identity "):
        psi.PsiSecret().blind_points(bytes(points), first_index=psi.CHUNK_POINTS)


def test_check_ids_counts_and_never_echoes() -> None:
    psi.check_ids(["a", "b"], "ids")
    with pytest.raises(InvalidArgument, match=r"^ids: 2 empty ids \(first at position 1\)$"):
        psi.check_ids(["secret-a", "", "secret-b", ""], "ids")
    with pytest.raises(InvalidArgument, match=r"^ids: 3 duplicate ids \(first at position 2\)$") as err:
        psi.check_ids(["secret-a", "secret-b", "secret-a", "secret-b", "secret-a"], "ids")
    assert "secret" not in str(err.value)
    with pytest.raises(InvalidArgument, match=r"^ids: 1 empty id \(first at position 0\); 1 duplicate id \(first"):
        psi.check_ids(["", "x", "x"], "ids")
    with pytest.raises(InvalidArgument, match=r"^ids: 1 ids are not valid unicode \(first at position 1"):
        psi.check_ids(["x", "\ud800"], "ids")


# --- the secret ------------------------------------------------------------------


def test_secret_is_never_serialised() -> None:
    k = psi.PsiSecret(workers=1)
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy, lambda s: s.__getstate__()):
        with pytest.raises(TypeError):
            attempt(k)
    assert repr(k) == "PsiSecret(live, workers=1)"


def test_forget_makes_use_raise() -> None:
    k = psi.PsiSecret()
    points = k.blind_ids(["a"])
    k.forget()
    k.forget()
    assert repr(k).startswith("PsiSecret(forgotten")
    with pytest.raises(psi.SecretForgotten):
        k.blind_ids(["a"])
    with pytest.raises(psi.SecretForgotten):
        k.blind_points(points)


# --- exact matching and ordering ------------------------------------------------


def _prefix8_match(own: bytes, peer: bytes) -> np.ndarray:
    """A planted bug: tags compared on their first 8 bytes only."""
    first = {t[:8] for t in _points(peer)}
    return np.asarray([i for i, t in enumerate(_points(own)) if t[:8] in first], dtype=np.int64)


def _reference_match(own: bytes, peer: bytes) -> np.ndarray:
    theirs = set(_points(peer))
    return np.asarray([i for i, t in enumerate(_points(own)) if t in theirs], dtype=np.int64)


# Tags from few prefixes and suffixes: shared 8-byte prefixes, trailing NULs and
# spaces, bytes >= 0x80 (an order that is not unsigned memcmp would show).
TAG_PART = st.sampled_from([b"\x00" * 16, b"\x20" * 16, b"\xff" * 16, b"\x7f" + b"\x80" * 15, bytes(range(16))])
TAGS = st.lists(st.tuples(TAG_PART, TAG_PART).map(b"".join), max_size=20).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(own=TAGS, peer=TAGS)
def test_match_and_order_are_exact(own: bytes, peer: bytes) -> None:
    found = psi.match(own, peer)
    assert found.dtype == np.int64
    assert found.tolist() == _reference_match(own, peer).tolist()
    ordered = psi.canonical_order(own, found)
    assert [own[i * P : (i + 1) * P] for i in ordered] == sorted(own[i * P : (i + 1) * P] for i in found)
    assert psi.digest(own, found) == hashlib.sha256(b"".join(own[i * P : (i + 1) * P] for i in ordered)).digest()


def _with_prefix_collisions(match: MatchFn) -> MatchFn:
    """`match` fed, besides the peer's tags, a forged tag for each own tag that
    shares its first 8 bytes only (an 8-byte comparison cannot tell them apart)."""

    def forged(own: bytes, peer: bytes) -> np.ndarray:
        return match(own, b"".join(t[:8] + bytes(24) for t in _points(own)) + peer)

    return forged


def test_planted_prefix_bug_is_caught() -> None:
    """Tags equal in their first 8 bytes but not after: the exact match keeps
    them apart; the planted 8-byte comparison does not, and both checks the
    tests apply (against the reference, against plain sets) fail on it."""
    prefix = bytes(range(1, 9))
    own = prefix + b"\xaa" * 24 + b"\x09" * 32
    peer = prefix + b"\xbb" * 24 + b"\x09" * 32
    assert psi.match(own, peer).tolist() == _reference_match(own, peer).tolist() == [1]
    assert _prefix8_match(own, peer).tolist() == [0, 1]

    a, b = ["a", "b", "c"], ["b", "c", "d"]
    check_against_sets(a, b, _with_prefix_collisions(psi.match))
    with pytest.raises(AssertionError):
        check_against_sets(a, b, _with_prefix_collisions(_prefix8_match))


# --- permutation and chunks -----------------------------------------------------


def test_random_permutation() -> None:
    for n in (0, 1, 2, 1000):
        perm = psi.random_permutation(n)
        assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(n))
    counts = collections.Counter(tuple(psi.random_permutation(3).tolist()) for _ in range(6000))
    assert len(counts) == 6 and all(850 < c < 1150 for c in counts.values())  # ~10 sigma apart


def test_chunks() -> None:
    data = GOOD[: 1000 * P]
    parts = list(psi.chunks(data, points=300))
    assert [len(p) // P for p in parts] == [300, 300, 300, 100]
    assert b"".join(parts) == data
    assert list(psi.chunks(b"")) == []
    assert psi.CHUNK_POINTS * P == 1 << 20
