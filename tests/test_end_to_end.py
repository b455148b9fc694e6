"""End to end over real gRPC, each party in its own process, real Paillier:
the federated model equals the plain-numpy run of the same algorithm, with
and without the assistant, and reaches scikit-learn's AUC."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from tests.conftest import make_federation, read_shard
from tests.reference_run import ReferenceRun, reference_from_shards
from vfl.cli.client import VflClient
from vfl.common.crypto.backend import PublicKey
from vfl.common.jobconfig import JobConfig
from vfl.v1 import client_pb2

CONFIG = JobConfig(epochs=3, batch_size=64, learning_rate=0.15, l2=0.01, seed=7)


def train(client: VflClient, config: JobConfig, train_ids: list[str], job_id: str) -> client_pb2.JobStatus:
    client.start_training(config, train_ids, job_id)
    final = client.wait(job_id)
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
    return final


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_federated_model_matches_plain_numpy(federation, client, breast):
    final = train(client, CONFIG, breast.train_ids, "match-ref")
    a = read_shard(federation, "active", "match-ref")
    b = read_shard(federation, "passive", "match-ref")
    # Each party's initial weights come from its own record, never the peer.
    reference = reference_from_shards(a, b, CONFIG, breast.train_ids)
    assert final.iteration == len(reference.batches) == 21
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


@pytest.mark.parametrize(
    "rule",
    [
        {"optimizer": "adam", "learning_rate": 0.05, "lr_decay": "exponential", "decay_rate": 0.9, "decay_steps": 5},
        {"optimizer": "nesterov", "learning_rate": 0.05, "momentum": 0.8, "lr_decay": "inverse_time"},
        {"optimizer": "rmsprop", "learning_rate": 0.02, "lr_decay": "step", "decay_rate": 0.5, "decay_steps": 7},
    ],
    ids=lambda r: r["optimizer"],
)
def test_each_party_optimiser_matches_plain_numpy(federation, client, breast, rule):
    """Each party runs the job's optimiser on its own weights with its own
    state; the model is the plain run's with the same rule."""
    config = CONFIG.model_copy(update=rule)
    job_id = f"opt-{rule['optimizer']}"
    final = train(client, config, breast.train_ids, job_id)
    a = read_shard(federation, "active", job_id)
    b = read_shard(federation, "passive", job_id)
    reference = reference_from_shards(a, b, config, breast.train_ids)
    assert final.iteration == len(reference.batches)
    assert relative_error(np.r_[a["weights"], a["intercept"]], reference.w_active) < 1e-4
    assert relative_error(np.asarray(b["weights"]), reference.w_passive) < 1e-4
    # Not plain SGD in disguise: the SGD run ends elsewhere.
    sgd = reference_from_shards(a, b, CONFIG, breast.train_ids)
    assert relative_error(reference.w_passive, sgd.w_passive) > 1e-2


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


def test_same_model_without_the_assistant(tmp_path, breast):
    """C only relays: without it, the job is the same algorithm to the same
    precision (the initial weights are each party's own random draw, so two
    runs differ; each matches the plain run from its own initial weights)."""
    with make_federation(tmp_path, assistant=False) as direct:
        assert "assistant" not in direct.services
        with VflClient(direct.active_address) as c:
            c.wait_ready(30)
            train(c, CONFIG, breast.train_ids, "match-ref")
            probs = c.predict("match-ref", breast.test_ids[:20])
        a = read_shard(direct, "active", "match-ref")
        b = read_shard(direct, "passive", "match-ref")
    reference = reference_from_shards(a, b, CONFIG, breast.train_ids)
    assert relative_error(np.r_[a["weights"], a["intercept"]], reference.w_active) < 1e-4
    assert relative_error(np.asarray(b["weights"]), reference.w_passive) < 1e-4
    np.testing.assert_allclose(probs, reference.predict(breast.test_ids[:20]), rtol=0, atol=1e-6)


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
    """Production key size: two epochs through the assistant."""
    config = JobConfig(epochs=2, seed=3)  # B stores no model under 10 iterations
    with make_federation(tmp_path, key_bits=2048) as fed:
        with VflClient(fed.active_address, timeout_s=300) as c:
            c.wait_ready(60)
            train(c, config, breast.train_ids, "big-keys")
            probs = c.predict("big-keys", breast.test_ids)
        shard = read_shard(fed, "active", "big-keys")
        b_shard = read_shard(fed, "passive", "big-keys")
    assert PublicKey.from_dict(shard["passive_key"]).bits == 2048
    ref = reference_from_shards(shard, b_shard, config, breast.train_ids)
    assert relative_error(np.r_[shard["weights"], shard["intercept"]], ref.w_active) < 1e-4
    np.testing.assert_allclose(probs, ref.predict(breast.test_ids), rtol=0, atol=1e-6)
    y_test = np.array([breast.labels[i] for i in breast.test_ids])
    assert roc_auc_score(y_test, probs) > 0.98


def test_early_stopping_on_loss_change_and_watch_stream(client, breast):
    # B stores a model stopped early only after its VFL_MIN_ITERATIONS (10).
    config = JobConfig(epochs=20, seed=5, tol=0.5, loss_every=5)
    client.start_training(config, breast.train_ids, "early-stop")
    events = list(client.watch("early-stop"))
    final = client.status("early-stop")
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
    # The loss barely moves after the first iterations: a huge tol stops at the second check.
    assert final.iteration == 10 < final.total_iterations == 140
    assert any("early stop" in e.message for e in events)
    iterations = [e.iteration for e in events if e.HasField("loss")]
    assert iterations == sorted(iterations) and iterations[-1] == 10
    assert events[-1].state == client_pb2.JOB_STATE_SUCCEEDED


def test_max_iterations_stops_the_job_and_shards_carry_job_metrics(federation, client, breast):
    status = train(client, JobConfig(epochs=5, max_iterations=10, loss_every=2), breast.train_ids, "max-iter")
    assert status.iteration == 10
    active, passive = read_shard(federation, "active", "max-iter"), read_shard(federation, "passive", "max-iter")
    assert active["metrics"]["iterations"] == passive["metrics"]["iterations"] == 10
    # Where the time and bytes went, per party (what `make bench` reports).
    assert {"encrypt", "matvec", "mask", "decrypt", "serialise", "rpc_wait"} <= set(active["metrics"]["phases_s"])
    assert {"encrypt", "matvec", "mask", "decrypt", "serialise", "handler"} <= set(passive["metrics"]["phases_s"])
    for shard in (active, passive):
        assert all(v >= 0 for v in shard["metrics"]["phases_s"].values())
        # 3 iterations of 64 ciphertexts of 1024 bits (OU test keys) at least.
        assert shard["metrics"]["bytes_sent"] > 3 * 64 * 128
        assert shard["metrics"]["peak_rss_bytes"] > 10 * 2**20


def test_differential_privacy_is_applied_accounted_and_reported(federation, client, breast):
    """With dp_epsilon each decrypting party noises what it returns (fresh
    noise from the OS CSPRNG: two runs differ), the epsilon spent reaches the
    target at the end, and job status, watch events and both shards report it."""
    config = JobConfig(epochs=3, seed=9, loss_every=0, dp_epsilon=8.0, batch_size=128)
    train(client, config, breast.train_ids, "dp-on")
    events = list(client.watch("dp-on"))
    train(client, config, breast.train_ids, "dp-on-again")
    status = client.status("dp-on")
    assert status.HasField("dp_epsilon_spent") and status.dp_epsilon_spent == pytest.approx(8.0, rel=0.01)
    spent = [e.dp_epsilon_spent for e in events if e.HasField("dp_epsilon_spent")]
    assert spent == sorted(spent) and spent[0] == 0.0 < spent[1] < spent[-1] <= 8.0 * 1.01
    a, b = read_shard(federation, "active", "dp-on"), read_shard(federation, "passive", "dp-on")
    for shard in (a, b):
        assert shard["dp"]["epsilon_spent"] == pytest.approx(8.0, rel=0.01)
        assert shard["dp"]["noise_multiplier"] > 0
    assert a["dp"]["protects"].startswith("y") and b["dp"]["protects"].startswith("X_B")
    again = read_shard(federation, "passive", "dp-on-again")
    assert not np.allclose(b["weights"], again["weights"])  # fresh noise each run, not seeded
    info = {m.model_id: m for m in client.list_models()}["dp-on"]
    assert info.dp_epsilon_spent == pytest.approx(8.0, rel=0.01)
    probs = client.predict("dp-on", breast.test_ids)
    y = np.array([breast.labels[i] for i in breast.test_ids])
    assert roc_auc_score(y, probs) > 0.9  # still a useful model at this epsilon


def test_no_differential_privacy_reports_no_epsilon(federation, client, breast):
    status = client.status("max-iter")
    assert not status.HasField("dp_epsilon_spent")
    assert read_shard(federation, "passive", "max-iter")["dp"] is None
    assert read_shard(federation, "active", "max-iter")["metrics"]["dp_epsilon_spent"] is None
