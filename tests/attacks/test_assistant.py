"""Red team: the adversary is the assistant C (or anyone on the A-C-B path).

C is an HTTP CONNECT tunnel; A and B run mutual TLS end to end through it
(PROTOCOL.md, "Assistant"). Every attack runs over real gRPC against the
real services under mTLS (1024-bit keys, test mode):

1. C originates: a client with the `assistant` certificate calls B's
   PartyService directly -> PERMISSION_DENIED, nothing set up at B.
   Planted regression: B with VFL_ALLOWED_PEERS=active,assistant (the old
   default) -> the same calls succeed.
2. C reads: a malicious C that keeps every byte it relays sees TLS records
   only: after the handshake nothing but encrypted application data; no id,
   no serialized message A or B received, no key or certificate bytes.
3. C alters, replays, reorders: a malicious C flips a byte (either
   direction), re-sends an earlier TLS record, or swaps two records, once,
   mid-job -> the TLS connection fails (bad record MAC), A loses the peer,
   reconnects through a fresh tunnel and the job *recovers*: it ends with
   the model of the uninterrupted plain run from the same initial weights
   (each party's own, recorded in its shard), to fixed-point precision; B
   decrypted nothing new (every masked gradient it decrypted for an
   iteration is the same vector).
4. C tunnels elsewhere: the real C refuses a CONNECT to any target but its
   upstream (403), a wrong or missing token (407), another method (405) and
   malformed requests (400), with one log line each and no payload.
   Planted regression: C with the target check undone tunnels to A.

The non-vacuity of 2 is in tests/test_transcript.py: the same detector finds
the plaintext in what C relays under VFL_INSECURE.
"""

from __future__ import annotations

import base64
import socket
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.attacks.mitm import APPLICATION_DATA, MaliciousRelay, tls_records
from tests.conftest import TEST_KEY_BITS, BreastSplit, make_federation, read_private_key, read_shard, tls_client
from tests.reference_run import reference_from_shards
from tests.test_transcript import ints, load_transcript, walk
from vfl.cli.federation import LocalFederation, start_service
from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import CipherVector
from vfl.common.errors import PeerError
from vfl.common.jobconfig import JobConfig
from vfl.common.rpc import status_of
from vfl.common.tls import TlsConfig
from vfl.services.active.alignment import align_as_active
from vfl.services.active.peer import PassiveClient
from vfl.v1 import client_pb2

CONFIG = JobConfig(epochs=3, batch_size=64, learning_rate=0.15, l2=0.01, seed=7)
TAMPER_AFTER = 40  # application-data records of a tunnel relayed untouched (the job runs ~150 each way)


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """A -> C (the real assistant) -> B, mutual TLS A-B."""
    with make_federation(tmp_path_factory.mktemp("real"), tls=True, assistant=True) as fed:
        yield fed


@pytest.fixture(scope="module")
def relay() -> Iterator[MaliciousRelay]:
    r = MaliciousRelay()
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def mitm(tmp_path_factory: pytest.TempPathFactory, relay: MaliciousRelay) -> Iterator[LocalFederation]:
    """A -> the malicious relay -> B, mutual TLS A-B, transcripts of A and B."""
    workdir = tmp_path_factory.mktemp("mitm")
    fed = make_federation(
        workdir,
        tls=True,
        assistant=False,
        transcripts=True,
        extra_env={"VFL_ASSISTANT_ADDRESS": relay.address, "VFL_RELAY_TOKEN": "malicious-relay-accepts-any-token"},
    )
    with fed:
        yield fed


def train(fed: LocalFederation, job_id: str, ids: list[str]) -> client_pb2.JobStatus:
    with tls_client(fed) as c:
        c.wait_ready(30)
        c.start_training(CONFIG, ids, job_id)
        return c.wait(job_id)


def model(fed: LocalFederation, job_id: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = read_shard(fed, "active", job_id), read_shard(fed, "passive", job_id)
    return np.r_[a["weights"], a["intercept"]], np.asarray(b["weights"])


@pytest.fixture(scope="module")
def clean_run(mitm: LocalFederation, relay: MaliciousRelay, breast: BreastSplit) -> dict[str, object]:
    """One job and a prediction through the malicious relay, untouched: what it captured."""
    relay.tamper = None
    relay.captured.clear()
    final = train(mitm, "clean", breast.train_ids)
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
    with tls_client(mitm) as c:
        c.predict("clean", breast.test_ids)
    return {"captured": dict(relay.captured)}


# --- 1. C originates ------------------------------------------------------------


def assistant_client(fed: LocalFederation, address: str) -> PassiveClient:
    files = fed.tls_files("assistant")
    assert files is not None
    return PassiveClient(address, 30, tls=TlsConfig.load(files), server_name="passive")


def originate(fed: LocalFederation, address: str, breast: BreastSplit, job_id: str) -> int:
    """C acting as A against B: its own key, then a job over the real ids."""
    key = get_backend("ou").generate_keypair(TEST_KEY_BITS)
    peer = assistant_client(fed, address)
    try:
        _, target_fp = peer.exchange_keys(key.public, TEST_KEY_BITS)
        aligned = align_as_active(peer, f"{job_id}-align", breast.train_ids)
        rows = aligned.positions(breast.train_ids, "ids")
        return int(peer.setup_job(job_id, CONFIG, target_fp, 10, aligned.alignment_id, rows).passive_features)
    finally:
        peer.close()


def test_assistant_certificate_cannot_call_the_passive_party(real: LocalFederation, breast: BreastSplit) -> None:
    with pytest.raises(PeerError) as info:
        originate(real, real.services["passive"].address, breast, "c-as-a")
    assert status_of(info.value) == grpc.StatusCode.PERMISSION_DENIED
    assert "identity 'assistant' may not call /vfl.v1.PartyService/ExchangeKeys" in str(info.value)
    peer = assistant_client(real, real.services["passive"].address)
    try:
        with pytest.raises(PeerError) as info:
            peer.setup_job("c-as-a", CONFIG, b"\0" * 32, 10, "an-alignment", list(range(len(breast.train_ids))))
        assert status_of(info.value) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        peer.close()
    log = real.services["passive"].log_path.read_text()
    assert "event=rpc_denied method=/vfl.v1.PartyService/ExchangeKeys identity=assistant" in log
    assert "event=keys_exchanged" not in log  # no job ran in this federation yet: B exchanged no key
    assert not list((real.workdir / "passive" / "data").rglob("c-as-a*"))


def test_planted_old_default_lets_the_assistant_act_as_a(tmp_path: Path, breast: BreastSplit) -> None:
    """The regression the test above catches: B admitting `assistant` (the old
    VFL_ALLOWED_PEERS default) hands C a key exchange and a job."""
    fed = make_federation(tmp_path, tls=True, assistant=False, extra_env={"VFL_ALLOWED_PEERS": "active,assistant"})
    try:
        passive = fed.start("passive")
        assert originate(fed, passive.address, breast, "c-as-a") == 20  # B's 20 features: the job is set up
        assert "event=keys_exchanged" in passive.log_path.read_text()
    finally:
        fed.stop()


# --- 2. C reads -----------------------------------------------------------------


def known_plaintexts(fed: LocalFederation, job_id: str) -> dict[str, bytes]:
    """Byte strings of the run that must not appear in what C relays: each
    message A and B received (its first 48 bytes: ids, row numbers,
    ciphertexts, masked values, norms, keys), the job id, the ids, the
    certificates."""
    out: dict[str, bytes] = {}
    for party in ("active", "passive"):
        for n, (method, direction, msg) in enumerate(load_transcript(fed.workdir / f"{party}.transcript.jsonl")):
            data = msg.SerializeToString()
            if len(data) >= 12 and (job_id.encode() in data or method in ("ExchangeKeys", "PredictScores")):
                out[f"{party} {method} {direction} #{n}"] = data[:48]
    out["job id"] = job_id.encode()
    for name in ("active", "passive"):
        pem = (fed.certs_dir / f"{name}.pem").read_text()
        der = base64.b64decode("".join(pem.strip().splitlines()[1:-1]))
        out[f"{name} certificate"] = der[-64:]  # includes the signature: unique
    return out


def test_malicious_relay_sees_only_tls_records(
    mitm: LocalFederation, clean_run: dict[str, object], breast: BreastSplit
) -> None:
    captured: dict[tuple[int, str], bytearray] = clean_run["captured"]  # type: ignore[assignment]
    assert captured, "nothing went through the relay"
    for (tunnel, direction), stream in captured.items():
        records = tls_records(bytes(stream))  # the whole stream is TLS records, nothing else
        types = [t for t, _, _ in records]
        assert types[0] == 22, (tunnel, direction)  # a handshake record first (ClientHello/ServerHello)
        # TLS 1.3: after the hello everything is encrypted (ChangeCipherSpec 20 is a compatibility no-op).
        assert set(types[1:]) <= {20, APPLICATION_DATA}, (tunnel, direction, sorted(set(types)))
        assert types.count(APPLICATION_DATA) > 10
    secrets = known_plaintexts(mitm, "clean")
    everything = b"".join(bytes(s) for s in captured.values())
    leaks = [name for name, value in secrets.items() if value in everything]
    assert not leaks, leaks
    # The ids: a run of the first ids as they travel (SetupJob: repeated string field 2).
    ids = b"".join(b"\x12" + bytes([len(i)]) + i.encode() for i in breast.train_ids[:4])
    assert ids not in everything


# --- 3. C alters, replays, reorders ---------------------------------------------


class Tamper:
    """Once, on the first tunnel, after TAMPER_AFTER application records of
    `direction`: flip a byte of a record, replay an earlier one, or swap two."""

    def __init__(self, how: str, direction: str) -> None:
        self.how, self.direction = how, direction
        self.seen = 0
        self.done = False
        self.first_tunnel: int | None = None
        self.saved: bytes | None = None

    def __call__(self, tunnel: int, direction: str, record: bytes) -> list[bytes]:
        if self.first_tunnel is None:
            self.first_tunnel = tunnel
        if self.done or tunnel != self.first_tunnel or direction != self.direction or record[0] != APPLICATION_DATA:
            return [record]
        self.seen += 1
        if self.how == "replay" and self.seen == 5:
            self.saved = record
        if self.seen < TAMPER_AFTER:
            return [record]
        if self.how == "flip":
            self.done = True
            i = len(record) // 2
            return [record[:i] + bytes([record[i] ^ 0x01]) + record[i + 1 :]]
        if self.how == "replay":
            self.done = True
            assert self.saved is not None
            return [self.saved, record]
        if self.saved is None:  # swap: hold this one, send it after the next
            self.saved = record
            return []
        self.done = True
        return [record, self.saved]


def masked_decryptions(fed: LocalFederation, job_id: str) -> dict[int, list[tuple[int, ...]]]:
    """What B decrypted, per iteration: [[h_A + R_A]]_B of each ExchangeMaskedGradients it received."""
    sk_b = read_private_key(fed, "passive")
    backend = get_backend("ou")
    out: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    current: tuple[str, int] | None = None
    for method, _, msg in load_transcript(fed.workdir / "passive.transcript.jsonl"):
        if method != "ExchangeMaskedGradients":
            continue
        if msg.HasField("header"):
            current = (msg.header.job_id, int(msg.header.iteration))
        if current is None or current[0] != job_id:
            continue
        found: dict[str, list] = defaultdict(list)
        walk(msg, found)
        for vec in found["ciphers"]:
            if vec.key_fingerprint == sk_b.public.fingerprint:
                out[current[1]].append(tuple(backend.decrypt(sk_b, CipherVector(sk_b.public, tuple(ints(vec))))))
    return out


@pytest.mark.parametrize(
    ("how", "direction"),
    [("flip", "b_to_a"), ("flip", "a_to_b"), ("replay", "a_to_b"), ("swap", "a_to_b"), ("replay", "b_to_a")],
)
def test_tampered_stream_breaks_tls_and_the_job_recovers_unaltered(
    mitm: LocalFederation,
    relay: MaliciousRelay,
    clean_run: dict[str, object],
    breast: BreastSplit,
    how: str,
    direction: str,
) -> None:
    job_id = f"tamper-{how}-{direction}"
    tamper = Tamper(how, direction)
    relay.tamper = tamper
    start = len(relay.targets)
    active_log = mitm.services["active"].log_path
    before = len(active_log.read_text())
    try:
        final = train(mitm, job_id, breast.train_ids)
    finally:
        relay.tamper = None
    assert tamper.done, "the relay never tampered: the test would be vacuous"
    # The TLS connection failed and A reconnected through a fresh tunnel.
    # When the altered record carried a call, that call failed and the job
    # resumed; a record with only connection frames (a ping, a window
    # update) fails no call: then A just reconnects.
    assert len(relay.targets) > start
    log = active_log.read_text()[before:]
    assert ("event=peer_lost" in log) == ("event=job_resumed" in log), log[-2000:]
    # ... to the uninterrupted model: nothing altered was used (an altered
    # ciphertext or share would be off by far more than fixed-point rounding).
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.iteration == 21
    w_a, w_b = model(mitm, job_id)
    shards = [read_shard(mitm, p, job_id) for p in ("active", "passive")]
    ref = reference_from_shards(*shards, CONFIG, breast.train_ids)
    assert np.linalg.norm(w_a - ref.w_active) / np.linalg.norm(ref.w_active) < 1e-4
    assert np.linalg.norm(w_b - ref.w_passive) / np.linalg.norm(ref.w_passive) < 1e-4
    # B released nothing extra: per iteration, every masked gradient it decrypted is the same vector.
    decrypted = masked_decryptions(mitm, job_id)
    assert len(decrypted) == final.iteration
    for iteration, vectors in decrypted.items():
        assert len(set(vectors)) == 1, f"iteration {iteration}: B decrypted {len(set(vectors))} different vectors"


# --- 4. C tunnels elsewhere -----------------------------------------------------


def http(address: str, request: bytes) -> str:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        return s.makefile("rb").readline().decode().strip()


def connect(target: str, token: str | None) -> bytes:
    auth = f"Proxy-Authorization: Bearer {token}\r\n" if token else ""
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode()


def test_assistant_tunnels_to_its_upstream_only(real: LocalFederation) -> None:
    c = real.services["assistant"].address
    token = real.relay_token_file.read_text().strip()
    upstream, active = real.services["passive"].address, real.services["active"].address
    port = upstream.rpartition(":")[2]
    cases = {
        connect(upstream, token): "200",
        connect(active, token): "403",  # A's own client API
        connect(f"localhost:{port}", token): "403",  # the upstream under another name: not the configured one
        connect("example.com:443", token): "403",
        connect(upstream, None): "407",
        connect(upstream, "x" * 43): "407",
        f"GET http://{upstream}/ HTTP/1.1\r\nHost: {upstream}\r\n\r\n".encode(): "405",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n": "400",  # a gRPC client talking to C directly: not HTTP/1.1
        b"CONNECT\r\n\r\n": "400",
        f"CONNECT {upstream}\r\n\r\n".encode(): "400",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n": "400",  # TLS to C
    }
    for request, status in cases.items():
        line = http(c, request)
        assert line.split(" ")[1:2] == [status], (request, line)
    log = real.services["assistant"].log_path.read_text()
    assert log.count("event=tunnel_refused") >= len(cases) - 1
    assert f"reason=CONNECT '{active}': not the upstream" in log
    assert "\\x16" not in log and "PRI *" not in log  # one line per refusal, no payload


def test_planted_any_target_assistant_tunnels_to_a(real: LocalFederation, tmp_path: Path) -> None:
    """The regression the test above catches: C without its target check
    tunnels to anything, e.g. A's client API."""
    token = real.relay_token_file.read_text().strip()
    env = {
        "VFL_UPSTREAM_ADDRESS": real.services["passive"].address,
        "VFL_RELAY_TOKEN": token,
        "VFL_RELAY_TOKEN_FILE": "",
        "VFL_PLANT": "assistant-any-target",
        "VFL_PLANT_MODULE": "vfl.services.assistant",
    }
    svc = start_service("assistant-planted", "tests.attacks.planted", env, tmp_path)
    try:
        assert http(svc.address, connect(real.services["active"].address, token)).split(" ")[1] == "200"
    finally:
        svc.stop()
