"""Privacy with two passive parties, from the transcripts: every message A,
B_1 and B_2 receive in a real run (each its own process, real gRPC, the
active service with VFL_PEERS) is recorded, and each party decrypts every
ciphertext under its own key with its own private key. What it reads must
be masked (B_j: A's masked gradient, the other B's masked gradient, the
other B's masked loss term; A: each B's masked gradient), or a value it is
entitled to (A: the loss, the scores). A ciphertext under another passive
party's key reaches B_j only as the relayed residual share it computes on
and cannot decrypt; no ciphertext ever arrives under a key its receiver
does not know, and no real number but the public config travels."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.conftest import TEST_KEY_BITS, read_private_key
from tests.test_transcript import fields_of, ints, load_transcript, looks_masked
from tests.test_two_passive_services import SPLIT, split_passive_csv
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import CipherVector
from vfl.common.jobconfig import JobConfig
from vfl.v1 import client_pb2

CONFIG = JobConfig(batch_size=64, epochs=2, seed=3, loss_every=3, max_iterations=12, learning_rate=0.2)
PASSIVE = sorted(SPLIT)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, breast):
    tmp = tmp_path_factory.mktemp("transcript-parties")
    fed = LocalFederation(
        tmp / "fed",
        BUNDLED_ACTIVE,
        BUNDLED_PASSIVE,
        key_bits=TEST_KEY_BITS,
        assistant=False,
        tls=False,
        transcripts=True,
        passive_parties=split_passive_csv(tmp),
    )
    with fed, VflClient(fed.active_address, timeout_s=120) as client:
        client.wait_ready(30)
        assert client.align(alignment_id="both").state == client_pb2.ALIGNMENT_STATE_SUCCEEDED
        client.start_training(CONFIG, breast.train_ids, job_id="t", holdout_ids=breast.test_ids, alignment_id="both")
        assert client.wait("t").state == client_pb2.JOB_STATE_SUCCEEDED
        client.predict("t", breast.test_ids)
        keys = {p: read_private_key(fed, p) for p in ("active", *PASSIVE)}
    transcripts = {p: load_transcript(fed.workdir / f"{p}.transcript.jsonl") for p in ("active", *PASSIVE)}
    return keys, transcripts


def test_each_passive_party_received_the_k_party_steps(run) -> None:
    _, transcripts = run
    for name in PASSIVE:
        methods = [m for m, d, _ in transcripts[name] if d == "request"]
        assert methods.count("ApplyGradient") == 12, name
        assert methods.count("DecryptPeerGradients") == 12, name
        assert "PredictScores" in methods
    # The loss terms go to the later party by name: B_2 decrypts B_1's, never the reverse.
    assert [m for m, _, _ in transcripts["b2"]].count("DecryptLossTerms") == 4
    assert "DecryptLossTerms" not in [m for m, _, _ in transcripts["b1"]]


def test_a_passive_party_decrypts_only_masked_values(run) -> None:
    keys, transcripts = run
    backend = get_backend("ou")
    pk_a = keys["active"].public
    for name in PASSIVE:
        sk = keys[name]
        other = next(keys[o].public for o in PASSIVE if o != name)
        decrypted: dict[str, int] = defaultdict(int)
        for method, _, msg in transcripts[name]:
            found = fields_of(msg)
            assert not found["doubles"] or all(
                value in {float(v) for v in CONFIG.model_dump().values() if isinstance(v, float)}
                for _, _, value in found["doubles"]
            ), f"{name} received a real in {method}"
            for vec in found["ciphers"]:
                if vec.key_fingerprint == pk_a.fingerprint:
                    continue
                if vec.key_fingerprint == other.fingerprint:
                    # The other party's residual share, relayed for B_j to compute on.
                    assert method == "ExchangeMaskedGradients", method
                    continue
                assert vec.key_fingerprint == sk.public.fingerprint, f"{name}: a ciphertext under an unknown key"
                plain = backend.decrypt(sk, CipherVector(sk.public, tuple(ints(vec))))
                assert looks_masked(plain, sk.public), f"{name} read an unmasked value in {method}"
                decrypted[method] += len(plain)
        p_other = 10
        assert decrypted["ExchangeMaskedGradients"] == 12 * (10 + 1)  # A's masked gradient, p_A + 1 values
        assert decrypted["DecryptPeerGradients"] == 12 * p_other
        assert decrypted.get("DecryptLossTerms", 0) == (4 if name == "b2" else 0)


def test_the_active_party_decrypts_only_masked_gradients_the_loss_and_scores(run) -> None:
    keys, transcripts = run
    backend = get_backend("ou")
    sk_a = keys["active"]
    passive_keys = {keys[n].public.fingerprint for n in PASSIVE}
    for method, _, msg in transcripts["active"]:
        found = fields_of(msg)
        for vec in found["ciphers"]:
            if vec.key_fingerprint in passive_keys:
                # [[b_j]]_j (to relay and compute on), B_j's gradients for the other B (to relay).
                assert method in ("ExchangeResidualShares", "ExchangeMaskedGradients", "ComputeLossCrossTerms"), method
                continue
            assert vec.key_fingerprint == sk_a.public.fingerprint, "a ciphertext under an unknown key"
            plain = backend.decrypt(sk_a, CipherVector(sk_a.public, tuple(ints(vec))))
            if method == "ExchangeMaskedGradients":
                assert looks_masked(plain, sk_a.public)
            else:
                assert method in ("ComputeLossShare", "PredictScores"), method
        for vec in found["residues"]:
            assert vec.key_fingerprint in passive_keys
            owner = next(keys[n].public for n in PASSIVE if keys[n].public.fingerprint == vec.key_fingerprint)
            assert looks_masked(ints(vec), owner)  # z = X^T b_j + R mod n_j: masked by its computer
