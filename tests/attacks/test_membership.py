"""Membership of ids outside the intersection, attacked from both sides
over real gRPC, each party its own process, B with its default policy.

The adversary knows the id space (a bank's customer numbers are a range)
and records every message it receives (VFL_TRANSCRIPT_PATH: the curious
party's view). It then runs a dictionary attack on the PSI points: for each
candidate id t it computes H(t) and looks for it among the points the other
party sent. With blinding, H(x)^k for a secret k the adversary never sees,
no candidate matches (DDH); against a planted twin that skips the other
party's exponentiation, the attack reads the other party's whole list,
including the ids outside the intersection.

Then the membership oracle of the old protocol (`Predict` for an id B lacks
answered FAILED_PRECONDITION "ids: 1 of 1 ids are not in this party's
data"): an id B lacks and an id B holds outside the model's population get
the same answer, a mark and no error, and nothing reaches B for either.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pytest

from tests.conftest import TEST_KEY_BITS
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common import psi
from vfl.common.jobconfig import JobConfig
from vfl.v1 import client_pb2, party_pb2

CONFIG = JobConfig(epochs=5, batch_size=64, seed=3)  # 15 iterations: B stores models from 10
# The customer-number space both adversaries enumerate.
SPACE = 700


def customer(k: int) -> str:
    return f"C{k:07d}"


def _write(path: Path, source: Path, ids: list[str], count: int) -> Path:
    with source.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)[:count]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[i, *r[1:]] for i, r in zip(ids, rows, strict=True)])
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A holds customers 0-399, B holds 200-599: 200 in common, 200 each
    outside the intersection."""
    root = tmp_path_factory.mktemp("membership")
    ids_a = [customer(k) for k in range(0, 400)]
    ids_b = [customer(k) for k in range(200, 600)]
    return {
        "root": root,
        "active": _write(root / "a.csv", BUNDLED_ACTIVE, ids_a, 400),
        "passive": _write(root / "b.csv", BUNDLED_PASSIVE, ids_b, 400),
        "ids_a": set(ids_a),
        "ids_b": set(ids_b),
    }


def federation(files: dict, name: str, plants: dict[str, str] | None = None) -> LocalFederation:
    return LocalFederation(
        files["root"] / name,
        files["active"],
        files["passive"],
        key_bits=TEST_KEY_BITS,
        assistant=False,
        tls=False,
        transcripts=True,
        plants=dict(plants or {}),
    )


def received_points(fed: LocalFederation, party: str) -> set[bytes]:
    """Every 32-byte point `party` received in an alignment."""
    # The messages carrying points: B receives them as requests, A as replies.
    carrying = {
        "passive": {("BlindActiveSet", "request"), ("FinishAlignment", "request")},
        "active": {("BlindActiveSet", "reply"), ("FetchPassiveSet", "reply")},
    }[party]
    out: set[bytes] = set()
    for line in (fed.workdir / f"{party}.transcript.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if (rec["method"].rsplit("/", 1)[-1], rec["direction"]) not in carrying:
            continue
        msg = party_pb2.PsiChunk.FromString(base64.b64decode(rec["payload"]))
        out.update(msg.points[i : i + psi.POINT_BYTES] for i in range(0, len(msg.points), psi.POINT_BYTES))
    return out


def dictionary_attack(points: set[bytes]) -> set[str]:
    """The candidates t whose H(t) is among the points received."""
    candidates = [customer(k) for k in range(SPACE)]
    hashed = psi.hash_to_group(candidates)
    return {t for k, t in enumerate(candidates) if hashed[k * psi.POINT_BYTES : (k + 1) * psi.POINT_BYTES] in points}


def align(fed: LocalFederation) -> client_pb2.Alignment:
    with VflClient(fed.active_address, timeout_s=120) as client:
        client.wait_ready(30)
        return client.align()


@pytest.mark.parametrize("planted", [False, True], ids=["real", "planted-unblinded-A"])
def test_curious_b_learns_no_id_of_a_outside_the_intersection(files, planted):
    with federation(files, f"b-attacks-{planted}", {"active": "unblinded-psi-points"} if planted else None) as fed:
        done = align(fed)
        found = dictionary_attack(received_points(fed, "passive"))
    outside = found - files["ids_b"]
    if planted:
        # The attack works on the twin: B reads A's whole list, 200 ids it does not hold among them.
        assert found == files["ids_a"] and len(outside) == 200
    else:
        assert done.state == client_pb2.ALIGNMENT_STATE_SUCCEEDED and done.size == 200
        assert not found


@pytest.mark.parametrize("planted", [False, True], ids=["real", "planted-unblinded-B"])
def test_curious_a_learns_no_id_of_b_outside_the_intersection(files, planted):
    with federation(files, f"a-attacks-{planted}", {"passive": "unblinded-psi-points"} if planted else None) as fed:
        done = align(fed)
        found = dictionary_attack(received_points(fed, "active"))
    if planted:
        assert found == files["ids_b"] and len(found - files["ids_a"]) == 200
    else:
        assert done.state == client_pb2.ALIGNMENT_STATE_SUCCEEDED and done.size == 200
        assert not found


def test_predict_answers_no_membership_question(files):
    """The old oracle: Predict for an id B lacks. Now an id B lacks and an id
    B holds but outside the model's population (B's default scope) get the
    same answer, a NOT_AT_PASSIVE mark and no error, and B receives nothing
    for either: the only call A makes to B is for the scored rows."""
    with federation(files, "oracle") as fed:
        with VflClient(fed.active_address, timeout_s=120) as client:
            client.wait_ready(30)
            aligned = client.align(include_ids=True)
            common = sorted(aligned.ids)
            train, outside_population = common[:-20], common[-20:]
            client.start_training(CONFIG, train, "m", alignment_id=aligned.alignment_id)
            assert client.wait("m").state == client_pb2.JOB_STATE_SUCCEEDED
            before = len((fed.workdir / "passive.transcript.jsonl").read_text().splitlines())
            lacking = sorted(files["ids_a"] - files["ids_b"])[:20]
            held = client.predict_reply("m", outside_population)
            lacked = client.predict_reply("m", lacking)
            after = len((fed.workdir / "passive.transcript.jsonl").read_text().splitlines())
            scored = client.predict_reply("m", train[:5])
    mark = client_pb2.PREDICTION_STATUS_NOT_AT_PASSIVE
    assert list(held.status) == list(lacked.status) == [mark] * 20
    assert after == before, "B received a message for ids it does not score"
    assert list(scored.status) == [client_pb2.PREDICTION_STATUS_SCORED] * 5
