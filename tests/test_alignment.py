"""Alignment by private set intersection over real gRPC, each party its own
process, on files whose ids only partly overlap: both parties hold the same
intersection in the same order, training on it reproduces the plain-numpy
model on the joined rows, prediction marks ids B lacks instead of failing,
and B refuses a job on an alignment it does not hold."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import make_federation, read_private_key, read_shard, write_csv
from tests.reference_run import reference_from_shards
from vfl.cli.client import VflClient
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE, split_aligned
from vfl.common.alignments import AlignmentRecord
from vfl.common.errors import PeerError
from vfl.common.jobconfig import JobConfig
from vfl.common.rpc import status_of
from vfl.common.storage import read_record, write_record
from vfl.services.active.peer import PassiveClient
from vfl.v1 import client_pb2

CONFIG = JobConfig(epochs=3, batch_size=64, learning_rate=0.15, l2=0.01, seed=7)


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, list(reader)


@pytest.fixture(scope="module")
def overlap(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A drops every 10th bundled row and adds 40 customers of its own; B
    drops every 7th and adds 30 of its own (unicode and long ids among them)."""
    root = tmp_path_factory.mktemp("overlap")
    header_a, rows_a = _rows(BUNDLED_ACTIVE)
    header_b, rows_b = _rows(BUNDLED_PASSIVE)
    # Long ids (a bank's customer numbers), so that a search of raw bytes for them means something.
    kept_a = [[customer(r[0]), *r[1:]] for k, r in enumerate(rows_a) if k % 10]
    kept_b = [[customer(r[0]), *r[1:]] for k, r in enumerate(rows_b) if k % 7]
    only_a = [[f"a-only-{k}-é", *r[1:]] for k, r in enumerate(rows_a[:40])]
    only_b = [[f"b-only-{k}-{'字' * 50}", *r[1:]] for k, r in enumerate(rows_b[:30])]
    active = write_csv(root / "active.csv", header_a, kept_a + only_a)
    passive = write_csv(root / "passive.csv", header_b, kept_b + only_b)
    ids_a = [r[0] for r in kept_a + only_a]
    ids_b = {r[0] for r in kept_b + only_b}
    with make_federation(root / "fed", active_csv=active, passive_csv=passive, transcripts=True) as fed:
        with VflClient(fed.active_address, timeout_s=120) as client:
            client.wait_ready(60)
            yield {"fed": fed, "client": client, "ids_a": ids_a, "ids_b": ids_b, "common": set(ids_a) & ids_b}


def customer(bundled_id: str) -> str:
    return f"customer-{int(bundled_id):06d}-é"


def bundled(ids: list[str]) -> list[str]:
    """The bundled files' ids of overlap customers (for the numpy reference)."""
    return [str(int(i.removeprefix("customer-").removesuffix("-é"))) for i in ids]


def _passive_record(fed, alignment_id: str) -> AlignmentRecord:
    return AlignmentRecord.from_dict(
        read_record(fed.workdir / "passive" / "data" / "alignments" / f"{alignment_id}.json", "alignment")
    )


def test_both_parties_hold_the_plain_intersection_in_the_same_order(overlap):
    client, fed = overlap["client"], overlap["fed"]
    done = client.align(alignment_id="all-of-a", include_ids=True)
    assert done.state == client_pb2.ALIGNMENT_STATE_SUCCEEDED, done.error
    assert set(done.ids) == overlap["common"] and done.size == len(overlap["common"])
    assert (done.active_size, done.passive_size) == (len(overlap["ids_a"]), len(overlap["ids_b"]))
    at_b = _passive_record(fed, "all-of-a")
    # Position k names the same customer at both parties.
    assert list(at_b.ids) == list(done.ids)
    assert at_b.peer == "insecure" and at_b.purpose == "training"
    listed = {a.alignment_id: a for a in client.list_alignments()}
    assert listed["all-of-a"].size == done.size and not listed["all-of-a"].ids
    with pytest.raises(grpc.RpcError) as info:
        client.start_alignment(alignment_id="all-of-a")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_subset_is_aligned_and_a_fresh_alignment_orders_differently(overlap):
    client = overlap["client"]
    subset = overlap["ids_a"][::2]
    first = client.align(subset, include_ids=True)
    second = client.align(subset, include_ids=True)
    assert set(first.ids) == set(subset) & overlap["ids_b"] == set(second.ids)
    # Fresh scalars each time: the order (by tag) is not a function of the ids.
    assert list(first.ids) != list(second.ids)


def test_training_on_the_alignment_matches_plain_numpy_on_the_joined_rows(overlap):
    client, fed = overlap["client"], overlap["fed"]
    aligned = client.align(include_ids=True)
    in_file_order = [i for i in overlap["ids_a"] if i in set(aligned.ids)]
    train_ids, test_ids = split_aligned(in_file_order, 0.2, 42)
    client.start_training(CONFIG, train_ids, "on-overlap", test_ids, alignment_id=aligned.alignment_id)
    final = client.wait("on-overlap")
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
    a, b = read_shard(fed, "active", "on-overlap"), read_shard(fed, "passive", "on-overlap")
    reference = reference_from_shards(a, b, CONFIG, bundled(train_ids))
    w_active = np.r_[a["weights"], a["intercept"]]
    assert np.linalg.norm(w_active - reference.w_active) / np.linalg.norm(reference.w_active) < 1e-4
    assert np.linalg.norm(b["weights"] - reference.w_passive) / np.linalg.norm(reference.w_passive) < 1e-4
    assert a["alignment_id"] == b["alignment_id"] == aligned.alignment_id
    # Ids B lacks are answered as such, scored ones equal the plain model.
    only_a = [i for i in overlap["ids_a"] if i not in overlap["ids_b"]][:5]
    reply = client.predict_reply("on-overlap", [*test_ids[:10], *only_a])
    scored = client_pb2.PREDICTION_STATUS_SCORED
    assert list(reply.status) == [scored] * 10 + [client_pb2.PREDICTION_STATUS_NOT_AT_PASSIVE] * 5
    assert np.isnan(reply.probabilities[10:]).all()
    np.testing.assert_allclose(reply.probabilities[:10], reference.predict(bundled(test_ids[:10])), atol=1e-6)


def test_new_ids_are_scored_after_a_fresh_psi_only_when_asked(overlap):
    client = overlap["client"]
    half = [i for i in overlap["ids_a"] if i in overlap["common"]]
    first, rest = half[: len(half) // 2], half[len(half) // 2 :]
    aligned = client.align(first)
    client.start_training(CONFIG, [], "on-half", alignment_id=aligned.alignment_id)
    assert client.wait("on-half").state == client_pb2.JOB_STATE_SUCCEEDED
    unasked = client.predict_reply("on-half", rest[:8])
    assert set(unasked.status) == {client_pb2.PREDICTION_STATUS_NOT_AT_PASSIVE}
    # B's scope is "any" in the functional federation: a new PSI aligns them.
    only_a = [i for i in overlap["ids_a"] if i not in overlap["ids_b"]][:3]
    asked = client.predict_reply("on-half", [*rest[:8], *only_a], align_new_ids=True)
    assert list(asked.status[:8]) == [client_pb2.PREDICTION_STATUS_SCORED] * 8
    assert list(asked.status[8:]) == [client_pb2.PREDICTION_STATUS_NOT_AT_PASSIVE] * 3
    assert np.isfinite(asked.probabilities[:8]).all()


def test_a_job_needs_an_alignment_and_b_refuses_one_it_does_not_hold(overlap):
    client, fed = overlap["client"], overlap["fed"]
    with pytest.raises(grpc.RpcError) as info:
        client.start_training(CONFIG, [], "no-alignment", alignment_id="")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "alignment_id: required" in info.value.details()
    peer = PassiveClient(fed.services["passive"].address, timeout_s=30)
    try:
        _, fp = peer.exchange_keys(read_private_key(fed, "active").public, 0)
        with pytest.raises(PeerError) as refused:
            peer.setup_job("on-nothing", CONFIG, fp, 10, "never-aligned", list(range(64)))
        assert status_of(refused.value) == grpc.StatusCode.NOT_FOUND
        assert "no alignment 'never-aligned'" in str(refused.value)
    finally:
        peer.close()


def test_duplicate_or_empty_ids_are_counted_not_echoed(overlap):
    client = overlap["client"]
    ids = overlap["ids_a"][:5]
    with pytest.raises(grpc.RpcError) as info:
        client.start_alignment([*ids, ids[0], ids[1]])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 ids are listed more than once" in info.value.details() and ids[0] not in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.start_alignment([*ids, "", ""])
    assert "2 empty ids" in info.value.details()


def test_no_id_of_either_party_reaches_the_other_in_the_clear(overlap):
    """After the alignments, jobs and predictions above (and one more of
    each here): the raw bytes of every message each party received hold no
    id of the other's file, nor of its own, as a protobuf string carries it
    (or bare, for the long ones)."""
    client, fed = overlap["client"], overlap["fed"]
    aligned = client.align()
    client.start_training(CONFIG, [], "for-transcript", alignment_id=aligned.alignment_id)
    assert client.wait("for-transcript").state == client_pb2.JOB_STATE_SUCCEEDED
    client.predict("for-transcript", overlap["ids_a"][:50])
    every_id = [i.encode() for i in set(overlap["ids_a"]) | overlap["ids_b"]]
    for party in ("active", "passive"):
        raw = (fed.workdir / f"{party}.transcript.jsonl").read_text()
        payloads = b"".join(base64.b64decode(json.loads(line)["payload"]) for line in raw.splitlines())
        assert len(payloads) > 100_000  # the whole traffic: alignments, steps, predictions
        leaked = [i for i in every_id if i in payloads]
        assert not leaked, f"{party} received {len(leaked)} ids in the clear"


def test_an_alignment_cut_short_by_a_restart_of_a_is_reported_failed(overlap):
    """A notes each alignment while it runs; a restart in the middle leaves
    it FAILED with the reason (its client would otherwise get NOT_FOUND)."""
    client, fed = overlap["client"], overlap["fed"]
    marker = fed.workdir / "active" / "data" / "alignments-running" / "cut-short.json"
    fed.services["active"].stop()
    write_record(marker, "alignment-running", {"started": 1.0e9, "active_size": 12})
    fed.start("active")
    client.wait_ready(60)
    cut = client.alignment("cut-short")
    assert cut.state == client_pb2.ALIGNMENT_STATE_FAILED and cut.active_size == 12
    assert cut.error == "the active party restarted during the alignment; start a new one"
    assert not marker.exists()
    # The id is free again, and every stored alignment survived the restart.
    again = client.align(alignment_id="cut-short")
    assert again.state == client_pb2.ALIGNMENT_STATE_SUCCEEDED and again.size == len(overlap["common"])
    assert "all-of-a" in {a.alignment_id for a in client.list_alignments()}


def test_disjoint_sets_align_to_nothing_and_a_job_on_them_is_refused(overlap):
    client = overlap["client"]
    only_a = [i for i in overlap["ids_a"] if i not in overlap["ids_b"]]
    empty = client.align(only_a, include_ids=True)
    assert empty.state == client_pb2.ALIGNMENT_STATE_SUCCEEDED
    assert (empty.size, list(empty.ids), empty.active_size) == (0, [], len(only_a))
    with pytest.raises(grpc.RpcError) as info:
        client.start_training(CONFIG, [], "on-nothing", alignment_id=empty.alignment_id)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "alignment" in info.value.details()
