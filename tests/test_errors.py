"""Error paths a user (or a misbehaving peer) can hit, each over real gRPC
with every party in its own process and real (test-size) Paillier keys.

Each case checks the exact status code, that the details name the field or
what was expected, that no secret leaks into the details, that the service
is still SERVING afterwards, and that a stored model is unchanged.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import RELAXED_POLICY, TEST_KEY_BITS, BreastSplit, make_federation, read_shard
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common import healthcheck, serde
from vfl.common.alignments import AlignmentRecord
from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import PrivateKey, PublicKey
from vfl.common.data import load_party_csv
from vfl.common.jobconfig import job_config
from vfl.common.protocol import steps
from vfl.common.protocol.batching import batch_schedule
from vfl.common.rpc import open_channel
from vfl.common.storage import read_record
from vfl.services.active.alignment import align_as_active
from vfl.services.active.peer import PassiveClient
from vfl.v1 import client_pb2, common_pb2, party_pb2, party_pb2_grpc

TRAINING_SERVICE = client_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
PARTY_SERVICE = party_pb2.DESCRIPTOR.services_by_name["PartyService"].full_name
P_ACTIVE, P_PASSIVE = 10, 20  # feature counts of the bundled breast split
MIN_BATCH = 3 * max(P_ACTIVE, P_PASSIVE)  # 60
SECRET_DIGITS = re.compile(r"\d{30,}")  # key material, ciphertexts, plaintexts

Code = grpc.StatusCode
T = TypeVar("T")


# --- helpers ------------------------------------------------------------------


def assert_refused(call: Callable[[], Any], code: grpc.StatusCode, *fragments: str) -> str:
    """Run `call`, expect an RPC error with `code` whose details contain every
    fragment and no long digit string; return the details."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):  # a server stream fails when read
            list(result)
    err = info.value
    details = err.details() or ""
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {details}"
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in details {details!r}"
    assert not SECRET_DIGITS.search(details), f"long digit string in details {details!r}"
    return details


def assert_serving(fed: LocalFederation, *names: str) -> None:
    """Each named service's process is alive and its health Check says SERVING."""
    service = {"active": TRAINING_SERVICE, "passive": PARTY_SERVICE}
    for name in names:
        svc = fed.services[name]
        assert svc.proc.poll() is None, f"{name} exited with code {svc.proc.returncode}"
        if name == "assistant":  # a CONNECT proxy: GET /healthz, no gRPC
            ok, line = healthcheck.check_http(svc.address, 10)
            assert ok, line
            continue
        with grpc.insecure_channel(svc.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service[name]), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


def retry_unavailable(call: Callable[[], T], timeout_s: float = 20.0) -> T:
    """`call`, retried while it is UNAVAILABLE: a channel that saw its peer down
    waits out gRPC's reconnect backoff (about a second) before trying again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != Code.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def align(client: VflClient, alignment_id: str, ids: list[str] | None = None) -> client_pb2.Alignment:
    """An alignment of A's ids (all of them by default) with B's, run to its
    end; fails the test unless it succeeds."""
    aligned = client.align(ids or [], alignment_id, include_ids=True)
    assert aligned.state == client_pb2.ALIGNMENT_STATE_SUCCEEDED, aligned.error
    return aligned


def train(client: VflClient, job_id: str, ids: list[str], alignment_id: str, **config: Any) -> client_pb2.JobStatus:
    """A small training job on an alignment, run to its end; fails the test unless it succeeds."""
    opts: dict[str, Any] = {"epochs": 1, "batch_size": 64}
    opts.update(config)
    client.start_training(job_config(**opts), ids, job_id=job_id, alignment_id=alignment_id)
    status = client.wait(job_id)
    assert status.state == client_pb2.JOB_STATE_SUCCEEDED, status.error
    return status


def start_request(
    job_id: str = "", ids: list[str] | None = None, alignment_id: str = "", **config: Any
) -> client_pb2.StartTrainingRequest:
    """A StartTrainingRequest built from raw proto fields, so that values the
    client-side JobConfig would refuse (NaN, negative) reach the server."""
    return client_pb2.StartTrainingRequest(
        job_id=job_id, config=common_pb2.TrainingConfig(**config), train_ids=ids or [], alignment_id=alignment_id
    )


def write_csv_variant(src: Path, dst: Path, drop_rows: int = 0, drop_column: str | None = None) -> Path:
    """A copy of a party CSV without its first `drop_rows` data rows and/or one column."""
    lines = src.read_text().splitlines()
    header, rows = lines[0].split(","), lines[1 + drop_rows :]
    keep = [i for i, name in enumerate(header) if name != drop_column]
    out = [",".join(header[i] for i in keep)] + [",".join(r.split(",")[i] for i in keep) for r in rows]
    dst.write_text("\n".join(out) + "\n")
    return dst


@contextmanager
def passive_restarted(fed: LocalFederation, csv: Path | None = None) -> Iterator[None]:
    """Stop B (and restart it with `csv` if given); on exit, restart it with its
    original CSV on the same port and data directory."""
    original = fed.passive_csv
    fed.services["passive"].stop()
    try:
        if csv is not None:
            fed.passive_csv = csv
            fed.start("passive")
        yield
    finally:
        fed.services["passive"].stop()
        fed.passive_csv = original
        fed.start("passive")


# --- a stored model, and direct PartyService calls to B -------------------------


@dataclass
class StoredModel:
    model_id: str
    active_shard: dict[str, Any]
    passive_shard: dict[str, Any]
    ids: list[str]
    probabilities: np.ndarray

    def assert_unchanged(self, fed: LocalFederation, client: VflClient) -> None:
        """Both shards on disk as stored, and the model still scores the same."""
        assert read_shard(fed, "active", self.model_id) == self.active_shard
        assert read_shard(fed, "passive", self.model_id) == self.passive_shard
        probs = retry_unavailable(lambda: client.predict(self.model_id, self.ids))
        np.testing.assert_allclose(probs, self.probabilities, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def aligned(federation: LocalFederation) -> str:
    """The id of an alignment of all of A's ids with B's (the bundled files
    hold the same ids: all 569 are in it), held by both parties."""
    with VflClient(federation.active_address, timeout_s=60) as c:
        c.wait_ready(30)
        done = align(c, "errors-all")
    assert done.size == 569
    return done.alignment_id


@pytest.fixture(scope="module")
def model(federation: LocalFederation, breast: BreastSplit, aligned: str) -> StoredModel:
    with VflClient(federation.active_address, timeout_s=60) as c:
        c.wait_ready(30)
        train(c, "errors-model", breast.train_ids[:128], aligned)
        ids = breast.test_ids[:16]
        probs = c.predict("errors-model", ids)
    return StoredModel(
        "errors-model",
        read_shard(federation, "active", "errors-model"),
        read_shard(federation, "passive", "errors-model"),
        ids,
        probs,
    )


class DirectParty:
    """PartyService at B called directly, as a (possibly misbehaving) A would."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = open_channel(address)
        self.stub = party_pb2_grpc.PartyServiceStub(self.channel)
        self.backend = get_backend("ou")

    def align(self, alignment_id: str, ids: list[str]) -> AlignmentRecord:
        """An honest private set intersection of `ids` with B's, as A runs it
        (B keeps its side for this caller's identity: "insecure" in plaintext)."""
        peer = PassiveClient(self.address, timeout_s=30)
        try:
            return align_as_active(peer, alignment_id, ids)
        finally:
            peer.close()

    def exchange_keys(self, key: PublicKey) -> tuple[PublicKey, bytes]:
        req = party_pb2.KeyExchangeRequest(active_key=serde.public_key_to_proto(key))
        reply = self.stub.ExchangeKeys(req, timeout=30)
        return serde.public_key_from_proto(reply.passive_key, "passive_key", 256), reply.target_fingerprint

    def setup_job(self, job_id: str, target_fp: bytes, alignment_id: str, rows: list[int]) -> int:
        """A job on `rows`, positions in the alignment (no id travels)."""
        spec = party_pb2.JobSpec(
            job_id=job_id,
            config=serde.config_to_proto(job_config(epochs=1, batch_size=64)),
            n_rows=len(rows),
            target_fingerprint=target_fp,
            active_features=P_ACTIVE,
            alignment_id=alignment_id,
        )
        chunks = [party_pb2.SetupJobChunk(spec=spec), party_pb2.SetupJobChunk(rows=rows)]
        return int(self.stub.SetupJob(iter(chunks), timeout=30).passive_features)

    def shares(self, header: common_pb2.StepHeader, rows: list[int], a_enc: Any) -> serde.StepMessage:
        chunks = serde.to_chunks(header, rows=rows, ciphers=a_enc)
        return serde.from_chunks(self.stub.ExchangeResidualShares(chunks, timeout=30), "reply")

    def gradients(self, header: common_pb2.StepHeader, grad_a: Any) -> serde.StepMessage:
        chunks = serde.to_chunks(header, ciphers=grad_a)
        return serde.from_chunks(self.stub.ExchangeMaskedGradients(chunks, timeout=30), "reply")

    def apply(self, header: common_pb2.StepHeader, key: PublicKey, residues: list[int]) -> float:
        chunks = serde.to_chunks(header, residues=(key, residues))
        return float(self.stub.ApplyGradient(chunks, timeout=30).update_sq_norm)

    def finish(self, header: common_pb2.StepHeader, aborted: bool = True) -> bool:
        req = party_pb2.FinishJobRequest(header=header, aborted=aborted)
        return bool(self.stub.FinishJob(req, timeout=30).stored)


@dataclass
class DirectJob:
    """A job set up at B by the test itself, under a key pair it generated."""

    party: DirectParty
    job_id: str
    active_key: PrivateKey
    passive_key: PublicKey
    target_fp: bytes
    rows: list[int]  # iteration 0's rows of the agreed schedule
    alignment: AlignmentRecord
    ids: list[str]

    @property
    def job_rows(self) -> list[int]:
        """The job's rows: its ids' positions in the alignment."""
        return self.alignment.positions(self.ids, "ids")

    def header(self, iteration: int = 0, target_fp: bytes | None = None) -> common_pb2.StepHeader:
        return serde.step_header(self.job_id, iteration, target_fp or self.target_fp)

    def first_share(self, key: PublicKey | None = None) -> Any:
        """[[a_S]]_A for the batch (under `key` instead, to misbehave)."""
        a = np.linspace(-0.5, 0.5, len(self.rows))
        return steps.first_encrypted_data(self.party.backend, key or self.active_key.public, a)

    def masked_gradient(self) -> Any:
        """A well-formed [[h_A + R_A]]_B: p_A + 1 ciphertexts under pk_B."""
        return self.party.backend.encrypt(self.passive_key, [7] * (P_ACTIVE + 1))

    def fresh(self) -> DirectJob:
        """Another job like this one: any refusal ends a job at B."""
        job_id = f"{self.job_id[:56]}-{secrets.token_hex(3)}"
        assert self.party.setup_job(job_id, self.target_fp, self.alignment.alignment_id, self.job_rows) == P_PASSIVE
        return replace(self, job_id=job_id)

    def assert_ended(self) -> None:
        """B ended the job at its refusal: the next step finds no job."""
        assert_refused(
            lambda: self.party.shares(self.header(), self.rows, self.first_share()),
            Code.NOT_FOUND,
            "no running job",
        )


@pytest.fixture(scope="module")
def passive_ids() -> list[str]:
    return load_party_csv(BUNDLED_PASSIVE).ids


@pytest.fixture(scope="module")
def keys() -> tuple[PrivateKey, PrivateKey]:
    """Two key pairs of a would-be active party."""
    backend = get_backend("ou")
    return backend.generate_keypair(TEST_KEY_BITS), backend.generate_keypair(TEST_KEY_BITS)


@pytest.fixture(scope="module")
def direct_alignment(federation: LocalFederation, passive_ids: list[str]) -> AlignmentRecord:
    """The test's own alignment with B, as a would-be A holding B's ids runs it."""
    party = DirectParty(federation.services["passive"].address)
    try:
        record = party.align("errors-direct", passive_ids)
    finally:
        party.channel.close()
    assert record.size == len(passive_ids)
    return record


@pytest.fixture()
def direct_job(
    federation: LocalFederation,
    keys: tuple[PrivateKey, PrivateKey],
    passive_ids: list[str],
    direct_alignment: AlignmentRecord,
    request: pytest.FixtureRequest,
) -> Iterator[DirectJob]:
    party = DirectParty(federation.services["passive"].address)
    passive_key, target_fp = party.exchange_keys(keys[0].public)
    job_id = f"direct-{request.node.name[:40]}"
    ids = passive_ids[:120]
    job_rows = direct_alignment.positions(ids, "ids")
    assert party.setup_job(job_id, target_fp, direct_alignment.alignment_id, job_rows) == P_PASSIVE
    # B accepts only the rows of the agreed schedule (120 rows: one batch).
    rows = batch_schedule(len(ids), 64, 1, job_config().seed, MIN_BATCH)[0].rows.tolist()
    job = DirectJob(party, job_id, keys[0], passive_key, target_fp, rows, direct_alignment, ids)
    yield job
    try:
        party.finish(job.header(), aborted=True)
    except grpc.RpcError as exc:
        assert exc.code() == Code.NOT_FOUND  # the test's refusal ended it
    finally:
        party.channel.close()


# --- 1. ids missing at B ---------------------------------------------------------


def test_ids_missing_at_passive_party_are_left_out_of_the_alignment(tmp_path: Path, breast: BreastSplit) -> None:
    """B lacks 7 of A's ids. The alignment holds the other 562, in one order at
    both parties, and its sizes count the sets without naming an id. A job
    names ids of the alignment: one with ids B lacks is refused by A as
    outside it (counted, not listed), and the job id stays free. Predict
    marks the ids B lacks NOT_AT_PASSIVE (NaN), an error for none of them;
    an id missing from A's own data is still A's error."""
    short_csv = write_csv_variant(BUNDLED_PASSIVE, tmp_path / "host_short.csv", drop_rows=7)
    dropped = sorted(set(load_party_csv(BUNDLED_PASSIVE).ids) - set(load_party_csv(short_csv).ids))
    assert len(dropped) == 7
    fed = LocalFederation(
        tmp_path / "fed", BUNDLED_ACTIVE, short_csv, key_bits=TEST_KEY_BITS, tls=False, extra_env=RELAXED_POLICY
    )
    with fed, VflClient(fed.active_address, 60) as c:
        c.wait_ready(30)
        aligned = align(c, "short")
        assert (aligned.size, aligned.active_size, aligned.passive_size) == (562, 569, 562)
        assert not set(dropped) & set(aligned.ids)
        at_b = read_record(fed.workdir / "passive" / "data" / "alignments" / "short.json", "alignment")
        assert at_b["ids"] == list(aligned.ids)  # position k names the same customer at both
        kept = [i for i in breast.train_ids if i not in dropped]
        ids = kept[:121] + dropped
        details = assert_refused(
            lambda: c.stub.StartTraining(start_request("short", ids, "short"), timeout=60),
            Code.INVALID_ARGUMENT,
            "train_ids",
            "7 of 128 ids are not in alignment 'short'",
        )
        assert not any(i in details.split() for i in dropped), "details should count missing ids, not list them"
        assert_serving(fed, "active", "assistant", "passive")
        # Nothing of the refused job stays behind: the same id trains on ids of the alignment.
        train(c, "short", kept[:128], "short")
        # Prediction: the ids B lacks are marked, not an error; the others scored.
        probe = [*kept[:5], *dropped, *breast.test_ids[:3]]
        probe = list(dict.fromkeys(probe))
        lacking = [i in dropped for i in probe]
        scored, absent = client_pb2.PREDICTION_STATUS_SCORED, client_pb2.PREDICTION_STATUS_NOT_AT_PASSIVE
        for align_new_ids in (False, True):  # a fresh PSI (B's scope is any here) finds them missing too
            reply = c.predict_reply("short", probe, align_new_ids=align_new_ids)
            assert list(reply.ids) == probe
            assert list(reply.status) == [absent if x else scored for x in lacking]
            probs = np.asarray(reply.probabilities)
            assert np.isnan(probs[lacking]).all() and np.isfinite(probs[~np.asarray(lacking)]).all()
        # An id A itself lacks is A's own error, for Predict and for a job.
        assert_refused(
            lambda: c.predict_reply("short", [*kept[:3], "not-in-a"]),
            Code.FAILED_PRECONDITION,
            "ids: 1 of 4 ids are not in this party's data",
        )
        assert_refused(
            lambda: c.stub.StartTraining(start_request("short-2", [*kept[:127], "not-in-a"], "short"), timeout=60),
            Code.INVALID_ARGUMENT,
            "train_ids: 1 of 128 ids are not in alignment 'short'",
        )
        assert_serving(fed, "active", "assistant", "passive")


# --- 2. wrong number of features at prediction ------------------------------------


def test_predict_with_passive_feature_count_changed_refused(
    federation: LocalFederation, model: StoredModel, client: VflClient, tmp_path: Path
) -> None:
    narrow_csv = write_csv_variant(BUNDLED_PASSIVE, tmp_path / "host_19.csv", drop_column="x19")
    with passive_restarted(federation, narrow_csv):
        assert load_party_csv(narrow_csv).n_features == P_PASSIVE - 1
        assert_refused(
            lambda: retry_unavailable(lambda: client.predict(model.model_id, model.ids)),
            Code.FAILED_PRECONDITION,
            "expects 20 features",
            "has 19",
        )
        assert_serving(federation, "active", "assistant", "passive")
    model.assert_unchanged(federation, client)


# --- 3. unknown job / model / alignment ---------------------------------------------


def test_unknown_job_model_and_alignment_not_found(
    federation: LocalFederation, model: StoredModel, client: VflClient, keys: tuple[PrivateKey, PrivateKey]
) -> None:
    stub = client.stub
    assert_refused(
        lambda: stub.GetJobStatus(client_pb2.GetJobStatusRequest(job_id="no-such-job"), timeout=30),
        Code.NOT_FOUND,
        "job_id",
        "no-such-job",
    )
    assert_refused(
        lambda: stub.WatchJob(client_pb2.WatchJobRequest(job_id="no-such-job"), timeout=30),
        Code.NOT_FOUND,
        "job_id",
        "no-such-job",
    )
    assert_refused(
        lambda: stub.Predict(client_pb2.PredictRequest(model_id="no-such-model", ids=model.ids), timeout=30),
        Code.NOT_FOUND,
        "model_id",
        "no-such-model",
    )
    assert_refused(
        lambda: stub.GetAlignment(client_pb2.GetAlignmentRequest(alignment_id="no-such-alignment"), timeout=30),
        Code.NOT_FOUND,
        "alignment_id",
        "no-such-alignment",
    )
    assert_refused(
        lambda: stub.StartTraining(start_request("on-nothing", alignment_id="no-such-alignment"), timeout=60),
        Code.NOT_FOUND,
        "alignment_id",
        "no-such-alignment",
    )
    party = DirectParty(federation.services["passive"].address)
    try:
        header = serde.step_header("no-such-job", 0, b"\x01" * 32)
        assert_refused(lambda: party.shares(header, [0], None), Code.NOT_FOUND, "header.job_id", "no-such-job")
        # B holds no such alignment for this caller: no job on it.
        _, target_fp = party.exchange_keys(keys[0].public)
        assert_refused(
            lambda: party.setup_job("on-nothing", target_fp, "no-such-alignment", list(range(120))),
            Code.NOT_FOUND,
            "alignment_id",
            "no alignment 'no-such-alignment'",
            "run StartAlignment first",
        )
    finally:
        party.channel.close()
    assert_serving(federation, "active", "assistant", "passive")
    assert client.status(model.model_id).state == client_pb2.JOB_STATE_SUCCEEDED
    model.assert_unchanged(federation, client)


# --- 4. a peer that is down --------------------------------------------------------


def check_passive_down_then_back(fed: LocalFederation, client: VflClient, ids: list[str], alignment_id: str) -> None:
    """With B stopped, StartTraining (on an alignment both hold) is
    UNAVAILABLE naming B, and an alignment fails naming B; A (and C) stay up;
    once B is back (its alignments kept), the same job id trains."""
    passive_address = fed.services["passive"].address
    with passive_restarted(fed):
        assert_refused(
            lambda: client.stub.StartTraining(start_request("after-outage", ids, alignment_id, epochs=1), timeout=60),
            Code.UNAVAILABLE,
            "passive party",
            passive_address,
        )
        failed = client.align(ids, f"outage-{secrets.token_hex(3)}")
        assert failed.state == client_pb2.ALIGNMENT_STATE_FAILED
        assert "passive party" in failed.error and passive_address in failed.error, failed.error
        assert not SECRET_DIGITS.search(failed.error)
        assert_serving(fed, "active", *(["assistant"] if fed.assistant else []))
        assert_refused(
            lambda: client.status("after-outage"), Code.NOT_FOUND, "after-outage"
        )  # the refused job left nothing behind
    assert_serving(fed, "passive")
    retry_unavailable(
        lambda: client.start_training(
            job_config(epochs=1, batch_size=64), ids, job_id="after-outage", alignment_id=alignment_id
        )
    )
    assert client.wait("after-outage").state == client_pb2.JOB_STATE_SUCCEEDED


def test_passive_party_down_through_assistant_unavailable(
    federation: LocalFederation, model: StoredModel, client: VflClient, breast: BreastSplit, aligned: str
) -> None:
    check_passive_down_then_back(federation, client, breast.train_ids[:128], aligned)
    model.assert_unchanged(federation, client)


def test_assistant_down_unavailable_names_the_assistant(
    federation: LocalFederation, model: StoredModel, client: VflClient, breast: BreastSplit, aligned: str
) -> None:
    """With C stopped, StartTraining is UNAVAILABLE naming the assistant, not
    B; once C is back (same port), the same job id trains through it."""
    assistant = federation.services["assistant"]
    assistant.stop()
    try:
        details = assert_refused(
            lambda: client.stub.StartTraining(
                start_request("c-outage", breast.train_ids[:128], aligned, epochs=1), timeout=60
            ),
            Code.UNAVAILABLE,
            f"assistant at {assistant.address}",
        )
        assert "Connection refused" in details
        assert_serving(federation, "active", "passive")
    finally:
        federation.start("assistant")
    assert_serving(federation, "assistant")
    retry_unavailable(
        lambda: client.start_training(
            job_config(epochs=1, batch_size=64), breast.train_ids[:128], job_id="c-outage", alignment_id=aligned
        )
    )
    assert client.wait("c-outage").state == client_pb2.JOB_STATE_SUCCEEDED
    model.assert_unchanged(federation, client)


def test_passive_party_down_without_assistant_unavailable(tmp_path: Path, breast: BreastSplit) -> None:
    with make_federation(tmp_path, assistant=False) as fed, VflClient(fed.active_address, 60) as c:
        c.wait_ready(30)
        check_passive_down_then_back(fed, c, breast.train_ids[:128], align(c, "before-outage").alignment_id)


# --- 5. messages under the wrong key, steps out of order ---------------------------


def test_wrong_target_fingerprint_refused(direct_job: DirectJob, keys: tuple[PrivateKey, PrivateKey]) -> None:
    job = direct_job
    # A target key B knows (it took part in the exchange), but not this job's.
    _, other_fp = job.party.exchange_keys(keys[1].public)
    assert other_fp != job.target_fp
    assert_refused(
        lambda: job.party.shares(job.header(target_fp=other_fp), job.rows, job.first_share()),
        Code.FAILED_PRECONDITION,
        "header.target_fingerprint",
    )
    # Any refusal ends the job at B: a probing peer gets one answer, not a series.
    job.assert_ended()
    fresh = job.fresh()
    reply = fresh.party.shares(fresh.header(), fresh.rows, fresh.first_share())
    assert len(reply.ciphers(fresh.passive_key, "[[b_S]]_B")) == len(fresh.rows)


def test_ciphertexts_under_another_key_refused(direct_job: DirectJob, keys: tuple[PrivateKey, PrivateKey]) -> None:
    job = direct_job
    other = keys[1].public
    assert_refused(
        lambda: job.party.shares(job.header(), job.rows, job.first_share(key=other)),
        Code.FAILED_PRECONDITION,
        "ciphertexts are under key",
        other.fingerprint.hex()[:16],
        f"expected {job.active_key.public.fingerprint.hex()[:16]}",
    )
    job.assert_ended()


def test_decryptor_returns_only_what_a_masked_gradient_can_be(direct_job: DirectJob) -> None:
    """OU's plaintext modulus p is B's secret, and a crafted [[-1]]_B decrypts
    to p - 1 (and so factors n). B decrypts for A only values a masked gradient
    can take, and refuses the rest without returning anything."""
    job = direct_job
    assert job.passive_key.scheme == "ou"
    job.party.shares(job.header(), job.rows, job.first_share())
    crafted = job.party.backend.encrypt(job.passive_key, [job.passive_key.n - 1] * (P_ACTIVE + 1))
    details = assert_refused(
        lambda: job.party.gradients(job.header(), crafted), Code.OUT_OF_RANGE, "masked gradient", "refused"
    )
    assert f"{job.passive_key.n - 1:x}"[:12] not in details
    job.assert_ended()  # one bit per job, not an oracle open for more queries


def test_steps_out_of_order_and_second_decryption_refused(direct_job: DirectJob) -> None:
    job = direct_job
    # Masked gradients (B decrypts) before the residual shares of the iteration.
    assert_refused(
        lambda: job.party.gradients(job.header(), job.masked_gradient()),
        Code.FAILED_PRECONDITION,
        "header.iteration",
        "expects residual shares of iteration 0",
    )
    job.assert_ended()
    job = job.fresh()
    job.party.shares(job.header(), job.rows, job.first_share())
    grad = job.masked_gradient()
    reply = job.party.gradients(job.header(), grad)
    assert reply.residues(job.passive_key, "z_A") == [7] * (P_ACTIVE + 1)
    # A retry of the very same request (a lost reply) is answered by replay:
    # the same bytes, not a second decryption with fresh randomness.
    again = job.party.gradients(job.header(), grad)
    assert again.residue_data == reply.residue_data and again.cipher_data == reply.cipher_data
    # B decrypts once per iteration: a different second request for iteration 0 is refused.
    assert_refused(
        lambda: job.party.gradients(job.header(), job.masked_gradient()),
        Code.FAILED_PRECONDITION,
        "expects apply gradient of iteration 0",
    )
    job.assert_ended()
    # So is one for a later iteration B has not reached.
    job = job.fresh()
    assert_refused(
        lambda: job.party.gradients(job.header(iteration=1), job.masked_gradient()),
        Code.FAILED_PRECONDITION,
        "got masked gradients of iteration 1",
    )


# --- 6. bad config, job ids ----------------------------------------------------------


def test_batch_size_under_leakage_floor_refused(
    federation: LocalFederation, model: StoredModel, client: VflClient, aligned: str
) -> None:
    details = assert_refused(
        lambda: client.stub.StartTraining(start_request(alignment_id=aligned, batch_size=MIN_BATCH - 1), timeout=60),
        Code.INVALID_ARGUMENT,
        "config.batch_size",
        f"at least {MIN_BATCH}",
        f"got {MIN_BATCH - 1}",
    )
    assert "p_A=10" in details and "p_B=20" in details
    assert_serving(federation, "active", "assistant", "passive")
    model.assert_unchanged(federation, client)


@pytest.mark.parametrize(
    ("learning_rate", "expected"),
    [(math.nan, "finite"), (-0.1, "greater than 0"), (0.0, "greater than 0")],
    ids=["nan", "negative", "zero"],
)
def test_bad_learning_rate_refused(
    federation: LocalFederation, client: VflClient, aligned: str, learning_rate: float, expected: str
) -> None:
    assert_refused(
        lambda: client.stub.StartTraining(start_request(alignment_id=aligned, learning_rate=learning_rate), timeout=60),
        Code.INVALID_ARGUMENT,
        "config.learning_rate",
        expected,
    )
    assert_serving(federation, "active")


@pytest.mark.parametrize("job_id", ["has space", "../escape", "x" * 65, "."], ids=["space", "path", "too-long", "dot"])
def test_malformed_job_id_refused(federation: LocalFederation, client: VflClient, aligned: str, job_id: str) -> None:
    assert_refused(
        lambda: client.stub.StartTraining(start_request(job_id, alignment_id=aligned), timeout=60),
        Code.INVALID_ARGUMENT,
        "job_id",
        "1-64 characters of [A-Za-z0-9_.-]",
    )
    assert_serving(federation, "active")


def test_duplicate_job_id_already_exists(
    federation: LocalFederation, model: StoredModel, client: VflClient, aligned: str
) -> None:
    assert_refused(
        lambda: client.stub.StartTraining(start_request(model.model_id, alignment_id=aligned), timeout=60),
        Code.ALREADY_EXISTS,
        "job_id",
        model.model_id,
    )
    assert_serving(federation, "active", "assistant", "passive")
    model.assert_unchanged(federation, client)


def test_too_few_train_rows_refused_and_job_id_reusable(
    federation: LocalFederation, client: VflClient, breast: BreastSplit, aligned: str
) -> None:
    assert_refused(
        lambda: client.stub.StartTraining(start_request("few-rows", breast.train_ids[:50], aligned), timeout=60),
        Code.INVALID_ARGUMENT,
        "training rows",
        f"at least {MIN_BATCH}",
    )
    # The user fixes the ids and retries under the same job id.
    train(client, "few-rows", breast.train_ids[:128], aligned)


# --- 7. messages never carry secrets -----------------------------------------------------


def test_refusals_do_not_echo_secret_values(direct_job: DirectJob) -> None:
    """Out-of-range values sent to B are refused without being echoed (each
    assert_refused also checks for long digit strings)."""
    job, party = direct_job, direct_job.party
    n = job.active_key.public.n

    even = n + 1
    bad_key = common_pb2.PublicKey(
        scheme="paillier", n=even.to_bytes(TEST_KEY_BITS // 8, "big"), fingerprint=b"\0" * 32
    )
    details = assert_refused(
        lambda: party.stub.ExchangeKeys(party_pb2.KeyExchangeRequest(active_key=bad_key), timeout=30),
        Code.INVALID_ARGUMENT,
        "active_key.n",
    )
    assert f"{even:x}" not in details

    too_big = job.active_key.public.cipher_modulus + 5
    chunk = common_pb2.StepChunk(
        header=job.header(),
        rows=job.rows,
        ciphertexts=common_pb2.CipherVector(
            key_fingerprint=job.active_key.public.fingerprint,
            width=job.active_key.public.cipher_width,
            data=too_big.to_bytes(job.active_key.public.cipher_width, "big") * len(job.rows),
        ),
    )
    details = assert_refused(
        lambda: party.stub.ExchangeResidualShares(iter([chunk]), timeout=30), Code.INVALID_ARGUMENT, "ciphertexts"
    )
    assert f"{too_big:x}" not in details

    # Bring a job to step 5, then send z_B values B must refuse after unmasking.
    job = job.fresh()
    party.shares(job.header(), job.rows, job.first_share())
    party.gradients(job.header(), job.masked_gradient())
    assert_refused(
        lambda: party.apply(job.header(), job.active_key.public, [n - 1] * P_PASSIVE),
        Code.OUT_OF_RANGE,
        "decrypted gradient",
    )
    job = job.fresh()
    party.shares(job.header(), job.rows, job.first_share())
    party.gradients(job.header(), job.masked_gradient())
    out_of_range = [n + 3] * P_PASSIVE
    chunks = serde.to_chunks(job.header(), residues=(job.active_key.public, [0] * P_PASSIVE))
    first = next(chunks)
    first.residues.data = b"".join(v.to_bytes(job.active_key.public.residue_width, "big") for v in out_of_range)
    details = assert_refused(
        lambda: party.stub.ApplyGradient(iter([first]), timeout=30), Code.INVALID_ARGUMENT, "residues", "[0, n)"
    )
    assert f"{n + 3:x}" not in details


def test_an_iteration_restarts_once_then_refuses(direct_job: DirectJob) -> None:
    """A that lost its state mid-iteration may start it again with a new
    request, once per iteration: each restart lets A have one more vector of
    the batch decrypted, which the batch-size guard bounds."""
    job = direct_job
    job.party.shares(job.header(), job.rows, job.first_share())
    job.party.gradients(job.header(), job.masked_gradient())
    job.party.shares(job.header(), job.rows, job.first_share())  # restart: allowed
    state = job.party.stub.GetJobState(party_pb2.JobStateRequest(header=job.header()), timeout=30)
    assert (state.iteration, state.phase) == (0, party_pb2.JOB_PHASE_GRADIENTS)
    job.party.gradients(job.header(), job.masked_gradient())
    assert_refused(
        lambda: job.party.shares(job.header(), job.rows, job.first_share()),
        Code.FAILED_PRECONDITION,
        "already started",
    )
