"""End to end over real gRPC, each party in its own process, real Paillier:
the federated model equals the plain-numpy run of the same algorithm, with
and without the assistant, and reaches scikit-learn's AUC."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cli.client import VflClient
from common.crypto.backend import PublicKey
from common.jobconfig import JobConfig
from tests.conftest import make_federation, read_shard
from tests.reference_run import ReferenceRun
from vfl.v1 import client_pb2

CONFIG = JobConfig(epochs=3, batch_size=64, learning_rate=0.15, l2=0.01, seed=7)


def train(client: VflClient, config: JobConfig, train_ids: list[str], job_id: str) -> client_pb2.JobStatus:
    client.start_training(config, train_ids, job_id)
    final = client.wait(job_id)
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
    return final


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference(breast) -> ReferenceRun:
    return ReferenceRun(CONFIG, breast.train_ids)


def test_federated_model_matches_plain_numpy(federation, client, breast, reference):
    final = train(client, CONFIG, breast.train_ids, "match-ref")
    assert final.iteration == len(reference.batches) == 21
    a = read_shard(federation, "active", "match-ref")
    b = read_shard(federation, "passive", "match-ref")
    w_active = np.r_[a["weights"], a["intercept"]]
    assert relative_error(w_active, reference.w_active) < 1e-4
    assert relative_error(np.asarray(b["weights"]), reference.w_passive) < 1e-4
    # Each party kept its own scaler: the same statistics the reference used.
    np.testing.assert_allclose(a["scaler"]["mean"], reference.scaler_a.mean)
    np.testing.assert_allclose(b["scaler"]["scale"], reference.scaler_b.scale)
    # Prediction through the protocol equals the plain model.
    probs = client.predict("match-ref", breast.test_ids)
    np.testing.assert_allclose(probs, reference.predict(breast.test_ids), rtol=0, atol=1e-6)
    # The job reported a loss that the plain Taylor loss of the last batch confirms.
    last = reference.trace[-1]
    rows = reference.batches[-1].rows
    u = 4 * (last["a"] + last["b"]) - 2 + 4 * reference.y[rows]
    expected = np.mean(np.log(2) - (2 * reference.y[rows] - 1) * u / 2 + u**2 / 8)
    assert final.loss == pytest.approx(expected, rel=1e-6)


def test_auc_is_within_0005_of_scikit_learn(client, breast):
    train(client, JobConfig(epochs=5, seed=42), breast.train_ids, "auc-check")
    probs = client.predict("auc-check", breast.test_ids)
    y_test = np.array([breast.labels[i] for i in breast.test_ids])
    auc = roc_auc_score(y_test, probs)
    ref = ReferenceRun(JobConfig(), breast.train_ids)
    x_train = np.hstack(
        [
            ref.active.features[ref.active.positions(breast.train_ids, "")],
            ref.passive.features[ref.passive.positions(breast.train_ids, "")],
        ]
    )
    x_test = np.hstack(
        [
            ref.active.features[ref.active.positions(breast.test_ids, "")],
            ref.passive.features[ref.passive.positions(breast.test_ids, "")],
        ]
    )
    y_train = np.array([breast.labels[i] for i in breast.train_ids])
    sk_auc = roc_auc_score(y_test, LogisticRegression(max_iter=1000).fit(x_train, y_train).decision_function(x_test))
    assert auc >= 0.99
    assert abs(auc - sk_auc) <= 0.005, (auc, sk_auc)


def test_same_model_without_the_assistant(tmp_path, breast, federation):
    """C only relays: the same job gives the same model when it is left out."""
    with make_federation(tmp_path, assistant=False) as direct:
        assert "assistant" not in direct.services
        with VflClient(direct.active_address) as c:
            c.wait_ready(30)
            train(c, CONFIG, breast.train_ids, "match-ref")
            probs = c.predict("match-ref", breast.test_ids[:20])
        a_direct = read_shard(direct, "active", "match-ref")
        b_direct = read_shard(direct, "passive", "match-ref")
    a_relay = read_shard(federation, "active", "match-ref")
    b_relay = read_shard(federation, "passive", "match-ref")
    # Masks differ between runs, but they cancel exactly: same fixed-point values.
    np.testing.assert_allclose(a_direct["weights"], a_relay["weights"], rtol=1e-12)
    np.testing.assert_allclose(b_direct["weights"], b_relay["weights"], rtol=1e-12)
    assert a_direct["intercept"] == pytest.approx(a_relay["intercept"], rel=1e-12)
    assert probs.shape == (20,)


def test_models_are_listed_and_survive_a_restart(federation, client, breast):
    infos = {m.model_id: m for m in client.list_models()}
    assert {"match-ref"} <= set(infos)
    info = infos["match-ref"]
    assert (info.active_features, info.passive_features, info.train_rows) == (10, 20, len(breast.train_ids))
    before = client.predict("match-ref", breast.test_ids[:10])
    for name in ("passive", "active"):
        federation.services[name].stop()
        federation.start(name)
    with VflClient(federation.active_address) as c:
        c.wait_ready(30)
        after = c.predict("match-ref", breast.test_ids[:10])
    # Keys and shards were reloaded from each party's own storage.
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-9)


@pytest.mark.slow
def test_2048_bit_keys_end_to_end(tmp_path, breast):
    """Production key size: one epoch through the assistant."""
    config = JobConfig(epochs=1, seed=3)
    with make_federation(tmp_path, key_bits=2048) as fed:
        with VflClient(fed.active_address, timeout_s=300) as c:
            c.wait_ready(60)
            train(c, config, breast.train_ids, "big-keys")
            probs = c.predict("big-keys", breast.test_ids)
        shard = read_shard(fed, "active", "big-keys")
    assert PublicKey.from_dict(shard["passive_key"]).bits == 2048
    ref = ReferenceRun(config, breast.train_ids)
    assert relative_error(np.r_[shard["weights"], shard["intercept"]], ref.w_active) < 1e-4
    np.testing.assert_allclose(probs, ref.predict(breast.test_ids), rtol=0, atol=1e-6)
    y_test = np.array([breast.labels[i] for i in breast.test_ids])
    assert roc_auc_score(y_test, probs) > 0.98


def test_early_stopping_on_loss_change_and_watch_stream(client, breast):
    config = JobConfig(epochs=20, seed=5, tol=0.5, loss_every=1)
    client.start_training(config, breast.train_ids, "early-stop")
    events = list(client.watch("early-stop"))
    final = client.status("early-stop")
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED
    # The loss barely moves after the first iterations: a huge tol stops at the second check.
    assert final.iteration == 2 < final.total_iterations == 140
    assert any("early stop" in e.message for e in events)
    iterations = [e.iteration for e in events if e.HasField("loss")]
    assert iterations == sorted(iterations) and iterations[-1] == 2
    assert events[-1].state == client_pb2.JOB_STATE_SUCCEEDED


def test_max_iterations_stops_the_job_and_shards_carry_job_metrics(federation, client, breast):
    status = train(client, JobConfig(epochs=5, max_iterations=3, loss_every=2), breast.train_ids, "max-iter")
    assert status.iteration == 3
    active, passive = read_shard(federation, "active", "max-iter"), read_shard(federation, "passive", "max-iter")
    assert active["metrics"]["iterations"] == passive["metrics"]["iterations"] == 3
    # Where the time and bytes went, per party (what `make bench` reports).
    assert {"encrypt", "matvec", "mask", "decrypt", "serialise", "rpc_wait"} <= set(active["metrics"]["phases_s"])
    assert {"encrypt", "matvec", "mask", "decrypt", "serialise", "handler"} <= set(passive["metrics"]["phases_s"])
    for shard in (active, passive):
        assert all(v >= 0 for v in shard["metrics"]["phases_s"].values())
        # 3 iterations of 64 ciphertexts of 1024 bits (OU test keys) at least.
        assert shard["metrics"]["bytes_sent"] > 3 * 64 * 128
        assert shard["metrics"]["peak_rss_bytes"] > 10 * 2**20


def test_gradient_noise_is_applied_and_reported(federation, client, breast):
    """Differential privacy: with dp_noise_std each party perturbs its own
    gradient, from the OS CSPRNG (so not reproducible from the seed), and
    both shards record the scale."""
    base = JobConfig(epochs=1, seed=9, loss_every=0)
    train(client, base, breast.train_ids, "dp-off")
    noisy = base.model_copy(update={"dp_noise_std": 0.05})
    train(client, noisy, breast.train_ids, "dp-on")
    train(client, noisy, breast.train_ids, "dp-on-again")
    off, on, again = (read_shard(federation, "passive", j) for j in ("dp-off", "dp-on", "dp-on-again"))
    assert on["metrics"]["dp_noise_std"] == 0.05 and off["metrics"]["dp_noise_std"] == 0.0
    assert read_shard(federation, "active", "dp-on")["metrics"]["dp_noise_std"] == 0.05
    assert not np.allclose(on["weights"], off["weights"])
    assert not np.allclose(on["weights"], again["weights"])  # fresh noise each run, not seeded
    probs = client.predict("dp-on", breast.test_ids)
    y = np.array([breast.labels[i] for i in breast.test_ids])
    assert roc_auc_score(y, probs) > 0.95  # still a useful model at this scale
