"""Privacy: record every message each party receives (and every byte the
assistant relays) in a real run (each party its own process, real gRPC, real Paillier), then check
that none of it is a plaintext its receiver should not see: features,
labels, weights, unmasked gradients or scores of the other side.

What a receiver *could* read is tested directly: every ciphertext under the
receiver's own key is decrypted with its private key (read from its data
directory) and must be either a value it is entitled to, or masked (uniform
modulo n for Paillier; 128 + 80 random bits over any hidden value for OU).
"""

from __future__ import annotations

import base64
import json
import typing
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from scipy.stats import binomtest

from tests.conftest import make_federation, read_private_key, read_shard, tls_client
from tests.reference_run import reference_from_shards
from vfl.cli.client import VflClient
from vfl.common import psi, serde
from vfl.common.alignments import AlignmentRecord
from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import CipherVector, PublicKey, target_fingerprint
from vfl.common.crypto.fixedpoint import FEATURE_SCALE_BITS, RESIDUAL_SCALE_BITS, signed
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.steps import HIDDEN_VALUE_BITS
from vfl.common.storage import read_record
from vfl.v1 import client_pb2, party_pb2

# B stores no model under 10 iterations; validation checks at 5, 10 and 14.
CONFIG = JobConfig(epochs=2, batch_size=64, seed=11, loss_every=2, validation_every=5)
PARTY_SERVICE = party_pb2.DESCRIPTOR.services_by_name["PartyService"]
GRADIENT_SCALE = 2.0 ** (FEATURE_SCALE_BITS + RESIDUAL_SCALE_BITS)


def message_class(method: str, direction: str):
    desc = PARTY_SERVICE.methods_by_name[method.rsplit("/", 1)[-1]]
    return message_factory.GetMessageClass(desc.input_type if direction == "request" else desc.output_type)


def load_transcript(path: Path) -> list[tuple[str, str, object]]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        msg = message_class(rec["method"], rec["direction"]).FromString(base64.b64decode(rec["payload"]))
        # A step's unary twin carries the same messages: count them as the step.
        out.append((rec["method"].rsplit("/", 1)[-1].removesuffix("Unary"), rec["direction"], msg))
    return out


SCALAR_KINDS = {
    FieldDescriptor.TYPE_DOUBLE: "doubles",
    FieldDescriptor.TYPE_FLOAT: "doubles",
    FieldDescriptor.TYPE_STRING: "strings",
    FieldDescriptor.TYPE_BYTES: "bytes",
}  # every other scalar (integers, enums, bools): "ints"


def walk(msg, found: dict[str, list]) -> None:
    """Collect every field of a message: ciphertext and residue vectors whole,
    and every double, integer (enums included), string and bytes value with
    the message and field it came in. Nothing is skipped."""
    name = msg.DESCRIPTOR.name
    if name == "CipherVector":
        found["ciphers"].append(msg)
        return
    if name == "ResidueVector":
        found["residues"].append(msg)
        return
    for field, value in msg.ListFields():
        values = value if field.is_repeated else [value]
        for v in values:
            if field.type == field.TYPE_MESSAGE:
                walk(v, found)
            else:
                found[SCALAR_KINDS.get(field.type, "ints")].append((name, field.name, v))


def ints(vec, width_attr="width") -> list[int]:
    w = getattr(vec, width_attr)
    return [int.from_bytes(vec.data[i : i + w], "big") for i in range(0, len(vec.data), w)]


def looks_masked(residues: list[int], key: PublicKey) -> bool:
    """No value is small. A real gradient at scale 2^52 is below 2^100.
    Paillier: a uniform residue mod n is below n/2^40 with probability 2^-40.
    OU: a mask of HIDDEN + 80 random bits is below 2^(HIDDEN + 40) with
    probability 2^-40, and no masked value reaches 2^(HIDDEN + 82)."""
    if key.mask_modulus_public:
        return all(abs(v) > key.n >> 40 for v in signed(residues, key.n))
    low, high = 1 << (HIDDEN_VALUE_BITS + 40), 1 << key.masked_value_bits(HIDDEN_VALUE_BITS)
    return all(low < v < high for v in residues)


def matches_any(values: np.ndarray, secrets: list[np.ndarray], tol: float) -> bool:
    pool = np.concatenate([s.ravel() for s in secrets])
    return any(np.min(np.abs(pool - v)) < tol for v in values)


@pytest.fixture(scope="module")
def run(tmp_path_factory, breast):
    workdir = tmp_path_factory.mktemp("transcript")
    with make_federation(workdir, transcripts=True) as fed:
        with VflClient(fed.active_address) as c:
            c.wait_ready(30)
            c.start_training(CONFIG, breast.train_ids, "transcript", holdout_ids=breast.test_ids)
            assert c.wait("transcript").state == client_pb2.JOB_STATE_SUCCEEDED
            c.predict("transcript", breast.test_ids)
        keys = {p: read_private_key(fed, p) for p in ("active", "passive")}
        shards = [read_shard(fed, p, "transcript") for p in ("active", "passive")]
    ref = reference_from_shards(*shards, CONFIG, breast.train_ids)
    transcripts = {p: load_transcript(workdir / f"{p}.transcript.jsonl") for p in ("active", "passive")}
    return workdir, keys, ref, transcripts


def allowed_doubles() -> set[float]:
    return {float(v) for v in CONFIG.model_dump().values() if isinstance(v, float)}


def test_every_party_received_the_steps(run):
    _, _, ref, transcripts = run
    n_iter = len(ref.batches)
    for party, direction in (("passive", "request"), ("active", "reply")):
        methods = [m for m, d, _ in transcripts[party] if d == direction]
        assert methods.count("ExchangeResidualShares") >= n_iter, party
        assert methods.count("ApplyGradient") == n_iter, party
        assert "PredictScores" in methods, party


def test_no_plaintext_reals_travel(run):
    """The only reals on the wire: the public job config and each party's own
    update norm. Features, labels, weights and scores never go in clear."""
    _, _, _, transcripts = run
    allowed = allowed_doubles()
    for party, records in transcripts.items():
        for method, _, msg in records:
            found: dict[str, list] = defaultdict(list)
            walk(msg, found)
            for owner, name, value in found["doubles"]:
                if (owner, name) == ("ApplyGradientReply", "update_sq_norm"):
                    continue
                assert value in allowed, f"{party} received a real {owner}.{name} in {method}"


def test_passive_party_can_decrypt_only_masked_gradients(run):
    """B decrypts [[h_A + R_A]]_B each iteration: the values it sees are
    uniform mod n_B, never A's cross gradient X_A^T b; everything else it
    receives is under pk_A, which it cannot decrypt."""
    _, keys, ref, transcripts = run
    sk_b, pk_a = keys["passive"], keys["active"].public
    backend = get_backend("ou")  # computes on both schemes
    h_active = [t["h_active"] for t in ref.trace]
    decrypted = 0
    for method, _, msg in transcripts["passive"]:
        found: dict[str, list] = defaultdict(list)
        walk(msg, found)
        for vec in found["ciphers"]:
            if vec.key_fingerprint == pk_a.fingerprint:
                continue
            assert vec.key_fingerprint == sk_b.public.fingerprint, "a ciphertext under an unknown key"
            assert method == "ExchangeMaskedGradients"
            plain = backend.decrypt(sk_b, CipherVector(sk_b.public, tuple(ints(vec))))
            assert looks_masked(plain, sk_b.public)
            values = np.array(signed(plain, sk_b.plaintext_modulus), dtype=float) / GRADIENT_SCALE
            assert not matches_any(values, h_active, 1e-3)
            decrypted += len(plain)
        for vec in found["residues"]:
            # z_B = h_B + R_B mod n_A: B's own masked gradient, masked by B itself.
            assert vec.key_fingerprint == pk_a.fingerprint
    assert decrypted == len(ref.batches) * (ref.x_active.shape[1] + 1)


def test_active_party_can_decrypt_only_what_it_may(run):
    """A decrypts [[h_B + R_B]]_A (masked), the loss share (a scalar) and the
    prediction scores u_A + u_B (revealed by design); never B's gradient,
    weights or per-sample scores during training."""
    _, keys, ref, transcripts = run
    sk_a, pk_b = keys["active"], keys["passive"].public
    backend = get_backend("ou")  # computes on both schemes
    h_passive = [t["h_passive"] for t in ref.trace]
    secrets = [ref.w_passive, *[t["w_passive"] for t in ref.trace], *[t["b"] for t in ref.trace]]
    for method, _, msg in transcripts["active"]:
        found: dict[str, list] = defaultdict(list)
        walk(msg, found)
        for vec in found["ciphers"]:
            if vec.key_fingerprint == pk_b.fingerprint:
                assert method == "ExchangeResidualShares"  # [[b_S]]_B: A holds no sk_B
                continue
            assert vec.key_fingerprint == sk_a.public.fingerprint
            plain = backend.decrypt(sk_a, CipherVector(sk_a.public, tuple(ints(vec))))
            if method == "ExchangeMaskedGradients":
                assert looks_masked(plain, sk_a.public)
                values = np.array(signed(plain, sk_a.plaintext_modulus), dtype=float) / GRADIENT_SCALE
                assert not matches_any(values, h_passive, 1e-3)
            elif method in ("ComputeLossShare", "ComputeValidationShare"):
                assert len(plain) == 1
            else:
                assert method == "PredictScores"
            if method != "ExchangeMaskedGradients":
                values = np.array(signed(plain, sk_a.plaintext_modulus), dtype=float) / 2.0**RESIDUAL_SCALE_BITS
                assert not matches_any(values, secrets, 1e-7)
        for vec in found["residues"]:
            # z_A = h_A + R_A mod n_B: A's own masked gradient.
            assert vec.key_fingerprint == pk_b.fingerprint
            assert looks_masked(ints(vec), pk_b)


# --- every other field: integers, strings, bytes --------------------------------


def fields_of(msg) -> dict[str, list]:
    found: dict[str, list] = defaultdict(list)
    walk(msg, found)
    return found


def test_every_integer_a_party_receives_is_public(run, breast):
    """Rows, counts, iterations, enums and config values: each one checked
    against what the protocol makes public, and the batch rows B receives are
    exactly the agreed schedule's. An integer field of any other kind fails."""
    _, _, ref, transcripts = run
    n_iter, p_a, p_b = len(ref.batches), ref.x_active.shape[1], ref.x_passive.shape[1]
    config = CONFIG.model_dump()
    rows_seen = 0
    alignment_rows: dict[str, list[int]] = defaultdict(list)
    for party, records in transcripts.items():
        for method, _, msg in records:
            found = fields_of(msg)
            iterations = {v for o, f, v in found["ints"] if (o, f) == ("StepHeader", "iteration")}
            rows = [v for o, f, v in found["ints"] if (o, f) == ("StepChunk", "rows")]
            for owner, name, value in found["ints"]:
                key = (owner, name)
                if key in (("StepHeader", "iteration"), ("JobStateReply", "iteration")):
                    assert value <= n_iter
                elif key in (("StepChunk", "best_iteration"), ("FinishJobRequest", "keep_iteration")):
                    # Which validation check A keeps: one of the schedule's checks.
                    assert party == "passive" and CONFIG.validation_due(value, n_iter), (key, value)
                elif key == ("StepChunk", "rows"):
                    assert party == "passive" and method in ("ExchangeResidualShares", "PredictScores"), (
                        f"rows in {method} to {party}"
                    )
                    if method == "PredictScores":
                        assert value in alignment_rows["holdout_rows"], "a scored row outside the holdout"
                elif key in (("SetupJobChunk", "rows"), ("SetupJobChunk", "holdout_rows")):
                    # Positions in the alignment, never ids: those of the job's own ids.
                    alignment_rows[name].append(value)
                elif key == ("AlignmentOpen", "active_size"):
                    assert party == "passive" and value == len(breast.labels)
                elif key == ("AlignmentOpened", "passive_size"):
                    assert party == "active" and value == len(breast.labels)
                elif key == ("AlignmentFinished", "size"):
                    assert party == "active" and value == len(breast.labels)
                elif key in (("AlignmentOpen", "purpose"), ("SetupJobReply", "scores_any_row")):
                    pass  # an enum and B's public policy
                elif owner == "TrainingConfig":
                    assert value == config[name], f"{party} received config.{name}={value}"
                elif key == ("JobSpec", "n_rows"):
                    assert value == len(breast.train_ids)
                elif key == ("JobSpec", "active_features"):
                    assert value == p_a
                elif key == ("JobSpec", "n_holdout"):
                    assert value == len(breast.test_ids)
                elif key in (("SetupJobReply", "passive_features"), ("KeyExchangeReply", "passive_features")):
                    assert party == "active" and value == p_b
                elif key in (("JobStateReply", "phase"), ("FinishJobReply", "stored")):
                    pass  # the step order and an acknowledgement
                else:
                    raise AssertionError(f"{party} received an integer {owner}.{name} in {method}")
            if rows and method == "ExchangeResidualShares":
                # proto3 leaves iteration 0 unset; a batch's rows come in one unary message here.
                (t,) = iterations or {0}
                assert rows == ref.batches[t].rows.tolist(), f"rows of iteration {t} off the schedule"
                rows_seen += 1
    assert rows_seen >= n_iter
    assert alignment_rows["rows"] == positions(run, breast.train_ids)
    assert alignment_rows["holdout_rows"] == positions(run, breast.test_ids)


def positions(run, ids: list[str]) -> list[int]:
    """Where the ids sit in the run's alignment, as A holds it."""
    workdir = run[0]
    (path,) = (workdir / "active" / "data" / "alignments").glob("*.json")
    record = AlignmentRecord.from_dict(read_record(path, "alignment"))
    return record.positions(ids, "ids")


# The configuration's string fields: each one of a fixed set of names.
CONFIG_CHOICES = {
    name: typing.get_args(JobConfig.model_fields[name].annotation)
    for name in ("model", "optimizer", "lr_decay", "residual")
}


def test_strings_received_are_public_names_and_no_id_travels(run):
    """Neither party receives an id: the only strings are the job's and the
    alignment's names and the key scheme. (tests/test_alignment.py also
    searches the raw bytes for ids, with ids long enough for that to mean
    something: the breast ids are numerals of 1-3 digits.)"""
    _, _, _, transcripts = run
    names = {name: set() for name in ("alignment_id", "job_id")}
    for party, records in transcripts.items():
        for method, _, msg in records:
            for owner, name, value in fields_of(msg)["strings"]:
                if name in names:
                    names[name].add(value)
                elif (owner, name) == ("PublicKey", "scheme"):
                    assert value in ("ou", "paillier")
                elif owner == "TrainingConfig" and name in CONFIG_CHOICES:
                    assert value in CONFIG_CHOICES[name], (name, value)  # a public choice, never data
                else:
                    raise AssertionError(f"{party} received a string {owner}.{name} in {method}")
    assert names["job_id"] == {"transcript"}
    (alignment_id,) = names["alignment_id"]
    assert alignment_id.startswith("align-")


def test_psi_points_b_receives_are_blinded(run, breast):
    """Every point B receives in an alignment is a valid group element and
    none is an unblinded hash H(x) of an id: A raised them to its secret.
    (A planted regression that sent H(x) would fail here.)"""
    _, _, _, transcripts = run
    hashed = psi.hash_to_group(list(breast.labels))
    plain = {hashed[i : i + psi.POINT_BYTES] for i in range(0, len(hashed), psi.POINT_BYTES)}
    received = bytearray()
    for method, _, msg in transcripts["passive"]:
        if method in ("BlindActiveSet", "FinishAlignment"):
            received += msg.points
    assert len(received) == 2 * psi.POINT_BYTES * len(breast.labels)
    points = {bytes(received[i : i + psi.POINT_BYTES]) for i in range(0, len(received), psi.POINT_BYTES)}
    assert not points & plain
    assert len(points) == 2 * len(breast.labels)  # no repeats: every one fresh


def test_bytes_received_are_keys_and_fingerprints(run):
    """The only bytes outside ciphertext and residue vectors: the sender's
    public key and the target-key fingerprint."""
    _, keys, _, transcripts = run
    pk_a, pk_b = keys["active"].public, keys["passive"].public
    target = target_fingerprint(pk_a, pk_b)
    peer_key = {"active": pk_b, "passive": pk_a}
    for party, records in transcripts.items():
        proto = serde.public_key_to_proto(peer_key[party])
        allowed = {proto.n, proto.g, proto.h, proto.fingerprint}
        for method, _, msg in records:
            for owner, name, value in fields_of(msg)["bytes"]:
                if name == "target_fingerprint":
                    assert value == target
                elif (owner, name) == ("PsiChunk", "points"):
                    assert len(value) % psi.POINT_BYTES == 0  # group elements (see the test above)
                elif (owner, name) == ("AlignmentFinished", "digest"):
                    assert party == "active" and len(value) == 32
                elif owner == "PublicKey":
                    assert value in allowed, f"{party} received a key that is not its peer's"
                else:
                    raise AssertionError(f"{party} received bytes {owner}.{name} in {method}")


def randomness_characters(key, ciphers: list[int]) -> list[int]:
    """OU: the quadratic character mod q of each ciphertext's randomness part
    c * G^-m mod n, which the key holder reads after decrypting m. A fresh
    hiding encryption (s^n, s uniform) makes it a fair coin whatever
    randomness the key holder put in its own ciphertexts; h^r alone (h is a
    square mod q) makes it always +1."""
    backend = get_backend("ou")
    plain = backend.decrypt(key, CipherVector(key.public, tuple(ciphers)))
    n, q, half = key.public.n, key.q, key.plaintext_modulus // 2
    out = []
    for c, m in zip(ciphers, plain, strict=True):
        e = m if m <= half else m - key.plaintext_modulus
        rho = c * pow(pow(key.public.g, e, n), -1, n) % n
        out.append(1 if pow(rho % q, (q - 1) // 2, q) == 1 else -1)
    return out


def test_ciphertext_randomness_a_decrypts_is_uniform(run):
    """Everything B sends A under pk_A (masked gradients, loss shares, scores)
    is re-randomised over the whole group: the character of its randomness
    is balanced. The same detector finds the structure of A's own ciphertexts
    (short h^r, no hiding), so it is not vacuous."""
    _, keys, _, transcripts = run
    sk_a = keys["active"]
    assert sk_a.public.scheme == "ou"
    received = [
        ints(vec)
        for method, _, msg in transcripts["active"]
        for vec in fields_of(msg)["ciphers"]
        if vec.key_fingerprint == sk_a.public.fingerprint
    ]
    chars = randomness_characters(sk_a, [c for vec in received for c in vec])
    assert len(chars) > 200
    minus = chars.count(-1)
    assert binomtest(minus, len(chars), 0.5).pvalue > 1e-4, (minus, len(chars))
    own = [
        c
        for method, _, msg in transcripts["passive"]
        if method == "ExchangeResidualShares"
        for vec in fields_of(msg)["ciphers"]
        if vec.key_fingerprint == sk_a.public.fingerprint
        for c in ints(vec)
    ]
    assert own and set(randomness_characters(sk_a, own[:200])) == {1}


# --- what the assistant relays -------------------------------------------------
# C is a CONNECT tunnel: it records raw bytes per tunnel and direction. Under
# TLS (the product) they are TLS records and nothing else; under VFL_INSECURE
# (tests only) they are clear HTTP/2 and C could read every message.


def load_tunnel(path: Path) -> dict[tuple[int, str], bytes]:
    """C's transcript: the bytes of each (tunnel, direction) in order."""
    out: dict[tuple[int, str], bytearray] = defaultdict(bytearray)
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        data = base64.b64decode(rec["payload"])
        assert rec["service"] == "assistant" and rec["length"] == len(data)
        out[(rec["tunnel"], rec["direction"])].extend(data)
    return {k: bytes(v) for k, v in out.items()}


def known_plaintexts(transcripts: dict[str, list], job_id: str) -> dict[str, bytes]:
    """Byte strings of a run that C must not see: the first 48 bytes of each
    message A and B received that names the job or carries a key or scores
    (ids, row numbers, ciphertexts, masked values, norms, keys), and the job id."""
    out = {"job id": job_id.encode()}
    for party in ("active", "passive"):
        for n, (method, direction, msg) in enumerate(transcripts[party]):
            data = msg.SerializeToString()
            if len(data) >= 12 and (job_id.encode() in data or method in ("ExchangeKeys", "PredictScores")):
                out[f"{party} {method} {direction} #{n}"] = data[:48]
    return out


def tls_record_types(stream: bytes) -> list[int]:
    """The content type of each TLS record of `stream`; AssertionError if it is not all TLS records."""
    types, i = [], 0
    while i < len(stream):
        ctype, version, length = stream[i], stream[i + 1 : i + 3], int.from_bytes(stream[i + 3 : i + 5], "big")
        assert ctype in (20, 21, 22, 23) and version in (b"\x03\x01", b"\x03\x03") and length <= (1 << 14) + 256, i
        types.append(ctype)
        i += 5 + length
    assert i == len(stream), "a truncated TLS record"
    return types


def test_assistant_sees_clear_grpc_under_insecure(run):
    """Documented: with VFL_INSECURE (tests only) the A-B connection is plaintext
    and C relays clear HTTP/2 -- the detector below finds the messages in it,
    so it is not vacuous for the TLS run."""
    workdir, _, _, transcripts = run
    tunnels = load_tunnel(workdir / "assistant.transcript.jsonl")
    a_to_b = [s for (_, d), s in tunnels.items() if d == "a_to_b"]
    assert a_to_b and all(s.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") for s in a_to_b)
    everything = b"".join(tunnels.values())
    secrets = known_plaintexts(transcripts, "transcript")
    found = [name for name, value in secrets.items() if value in everything]
    assert len(found) >= 0.9 * len(secrets), f"{len(found)} of {len(secrets)}"


@pytest.fixture(scope="module")
def tls_run(tmp_path_factory, breast):
    """The same job and prediction under mutual TLS (the product's transport)."""
    workdir = tmp_path_factory.mktemp("transcript-tls")
    with make_federation(workdir, transcripts=True, tls=True) as fed, tls_client(fed) as c:
        c.wait_ready(30)
        c.start_training(CONFIG, breast.train_ids, "transcript", holdout_ids=breast.test_ids)
        assert c.wait("transcript").state == client_pb2.JOB_STATE_SUCCEEDED
        c.predict("transcript", breast.test_ids)
    transcripts = {p: load_transcript(workdir / f"{p}.transcript.jsonl") for p in ("active", "passive")}
    return workdir, transcripts, load_tunnel(workdir / "assistant.transcript.jsonl")


def test_assistant_sees_only_tls_records(tls_run, breast):
    """C holds no key and terminates nothing: every byte it relays is part of
    a TLS record, everything after the hellos is encrypted application data
    (TLS 1.3), and no message A or B received, no id and no job id appear."""
    workdir, transcripts, tunnels = tls_run
    assert not (workdir / "assistant" / "data" / "keys").exists()
    assert tunnels, "C relayed nothing"
    for (tunnel, direction), stream in tunnels.items():
        types = tls_record_types(stream)
        assert types[0] == 22, (tunnel, direction)  # ClientHello / ServerHello
        assert set(types[1:]) <= {20, 23}, (tunnel, direction, sorted(set(types)))
    everything = b"".join(tunnels.values())
    secrets = known_plaintexts(transcripts, "transcript")
    assert len(secrets) > 20
    assert not [name for name, value in secrets.items() if value in everything]
    # Nothing C relays parses as one of our messages: no chunk of the ids as
    # SetupJob sends them, no gRPC method path, no protobuf message of the run.
    ids = b"".join(b"\x12" + bytes([len(i)]) + i.encode() for i in breast.train_ids[:4])
    assert ids not in everything and b"PartyService" not in everything and b"vfl.v1" not in everything


def test_the_checks_would_catch_an_unmasked_gradient(run):
    """The detector is not vacuous: an unmasked gradient fails it."""
    _, keys, ref, _ = run
    key = keys["passive"]
    h = ref.trace[0]["h_active"]
    encoded = [int(round(v * GRADIENT_SCALE)) % key.plaintext_modulus for v in h]
    assert not looks_masked(encoded, key.public)
    decoded = np.array(signed(encoded, key.plaintext_modulus), dtype=float) / GRADIENT_SCALE
    assert matches_any(decoded, [h], 1e-3)
