"""The federation with two passive parties, end to end through A's client
API, as `vfl demo --passive-csv b1.csv --passive-csv b2.csv` runs it: A, B_1
and B_2 each the real service in its own process (VFL_PEERS at A), mutual
TLS, the breast split's 20 passive columns divided between the two B's.
StartAlignment runs one PSI with each B; StartTraining trains on the ids all
three hold; every party's stored weights equal the plain-numpy run on the
joined table, and Predict returns the model's probabilities for held-out ids.
Also: what a k-party job does not serve yet is refused naming the field, a
job cut short by A's restart is reported FAILED and released at both B's,
and bad VFL_PEERS settings stop A with one line."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.attacks.harness import active_view, passive_features
from tests.conftest import TEST_KEY_BITS, BreastSplit, read_shard, tls_client
from tests.faultproxy import Faults, FaultyFederation
from tests.reference_run import assert_weights_close
from tests.test_services import run_service
from tests.test_two_passive_services import SPLIT, split_passive_csv
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common.data import load_party_csv
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.batching import Batch, batch_schedule, coalition_feature_counts, min_batch_size
from vfl.common.protocol.reference import train_plain
from vfl.common.protocol.sessions import TrainingPlan
from vfl.v1 import client_pb2

CONFIG = JobConfig(batch_size=64, epochs=2, seed=5, loss_every=4, max_iterations=12, learning_rate=0.2)


def two_passive_federation(tmp: Path) -> LocalFederation:
    return LocalFederation(
        tmp / "fed",
        BUNDLED_ACTIVE,
        BUNDLED_PASSIVE,
        key_bits=TEST_KEY_BITS,
        assistant=False,
        tls=True,
        passive_parties=split_passive_csv(tmp),
    )


def assert_plain_model(shards: dict[str, dict], train_ids: list[str], config: JobConfig) -> None:
    """Every party's stored weights: the plain run of the same algorithm on the joined table."""
    view = active_view(train_ids)
    joined = passive_features(train_ids)
    p_a, p_b = coalition_feature_counts(view.x.shape[1] - 1, [10, 10])
    floor = min_batch_size(p_a, p_b, False)
    schedule = batch_schedule(
        len(train_ids), config.batch_size, config.epochs, config.seed, floor, config.max_iterations
    )
    a = shards["active"]
    w_a, w_b = train_plain(
        view.x[:, :-1],
        joined,
        view.y,
        np.asarray(a["initial_weights"]),
        np.concatenate([np.asarray(shards[n]["initial_weights"]) for n in sorted(SPLIT)]),
        [Batch(b.epoch, b.rows) for b in schedule],
        TrainingPlan.of(config).optimizer,
        config.l2,
    )
    assert_weights_close(np.r_[a["weights"], a["intercept"]], w_a)
    assert_weights_close(np.asarray(shards["b1"]["weights"]), w_b[:10])
    assert_weights_close(np.asarray(shards["b2"]["weights"]), w_b[10:])
    assert np.linalg.norm(np.r_[a["weights"], a["intercept"]] - a["initial_weights"]) > 0.05


def standardised(shard: dict, raw: np.ndarray) -> np.ndarray:
    return (raw - np.asarray(shard["scaler"]["mean"])) / np.asarray(shard["scaler"]["scale"])


def test_the_active_service_trains_and_predicts_with_two_passive_services(tmp_path: Path, breast: BreastSplit) -> None:
    with two_passive_federation(tmp_path) as fed, tls_client(fed) as client:
        client.wait_ready(30)
        aligned = client.align(alignment_id="both")
        assert aligned.state == client_pb2.ALIGNMENT_STATE_SUCCEEDED, aligned.error
        assert aligned.size == len(breast.train_ids) + len(breast.test_ids)
        started = client.start_training(
            CONFIG, breast.train_ids, job_id="k2", holdout_ids=breast.test_ids, alignment_id="both"
        )
        assert started.total_iterations == 12
        final = client.wait("k2")
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
        probabilities = client.predict("k2", breast.test_ids)
        (info,) = client.list_models()
        shards = {n: read_shard(fed, n, "k2") for n in ("active", *SPLIT)}
    assert info.passive_features == 20 and info.active_features == 10
    assert_plain_model(shards, breast.train_ids, CONFIG)
    a = shards["active"]
    # The loss A reports at each check (the plain Taylor loss: test_two_passive_services).
    assert [t for t, _ in a["metrics"]["loss_history"]] == [4, 8, 12]
    # Predict: the model's probabilities, from A's and both B's shards.
    active = load_party_csv(BUNDLED_ACTIVE, "id", "y")
    passive = load_party_csv(BUNDLED_PASSIVE, "id")
    rows_a, rows_b = active.positions(breast.test_ids, "ids"), passive.positions(breast.test_ids, "ids")
    u = standardised(a, active.features[rows_a]) @ np.asarray(a["weights"]) + a["intercept"]
    for name, cols in SPLIT.items():
        raw = passive.features[rows_b][:, list(cols)]
        u += standardised(shards[name], raw) @ np.asarray(shards[name]["weights"])
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-u)), atol=1e-6)


def test_what_a_k_party_job_does_not_serve_is_refused_and_a_restart_fails_the_job(
    tmp_path: Path, breast: BreastSplit
) -> None:
    with two_passive_federation(tmp_path) as fed:
        with tls_client(fed) as client:
            client.wait_ready(30)
            assert client.align(alignment_id="both").state == client_pb2.ALIGNMENT_STATE_SUCCEEDED
            unserved = [
                ({"validation_every": 2}, "config.validation_every"),
                ({"dp_epsilon": 2.0, "loss_every": 0}, "config.dp_epsilon"),
                ({"residual": "poly5", "loss_every": 0}, "config.residual"),
            ]
            for update, field in unserved:
                config = JobConfig.model_validate({**CONFIG.model_dump(), **update})
                with pytest.raises(grpc.RpcError) as info:
                    client.start_training(config, breast.train_ids, holdout_ids=breast.test_ids, alignment_id="both")
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details().startswith(field), info.value.details()
                assert (
                    "several passive parties" in info.value.details()
                    or "one passive party only" in info.value.details()
                )
            # A restarts in the middle of a long job: the job is FAILED with the reason, and both B's let it go.
            long = JobConfig.model_validate({**CONFIG.model_dump(), "epochs": 50, "max_iterations": 0})
            client.start_training(long, breast.train_ids, job_id="cut", alignment_id="both")
            deadline = time.time() + 60
            while client.status("cut").iteration < 2:
                assert time.time() < deadline
                time.sleep(0.05)
        fed.services["active"].stop()
        fed.start("active")
        with tls_client(fed) as client:
            client.wait_ready(30)
            status = client.status("cut")
            assert status.state == client_pb2.JOB_STATE_FAILED
            assert "do not resume yet" in status.error
            # The federation goes on: a new job trains.
            job_id = client.start_training(CONFIG, breast.train_ids, job_id="after", alignment_id="both").job_id
            final = client.wait(job_id)
            assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
            assert not (fed.workdir / "active" / "data" / "models" / "cut.json").exists()
    for name in SPLIT:
        # Released at each B on A's restart; neither stored a model of it.
        log = (fed.workdir / f"{name}.log").read_text()
        assert "event=job_ended job=cut " in log and "reason=aborted by the active party" in log
        assert not (fed.workdir / name / "data" / "models" / "cut.json").exists()


@dataclass
class ResetsToB1(FaultyFederation):
    """The two-passive federation with a fault-injecting proxy on A -> B_1."""

    LINKS = {"b1": "a-b1"}  # noqa: RUF012 - FaultyFederation's class-level map


def test_connections_to_one_passive_party_reset_mid_job_give_the_plain_model(
    tmp_path: Path, breast: BreastSplit
) -> None:
    """A's connection to B_1 is reset again and again while the job runs: A
    repeats each broken iteration with the same requests, every party answers
    by replay, and all three store the uninterrupted model."""
    base = two_passive_federation(tmp_path)
    fed = ResetsToB1(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init})
    with fed, tls_client(fed) as client:
        client.wait_ready(30)
        assert client.align(alignment_id="both").state == client_pb2.ALIGNMENT_STATE_SUCCEEDED
        client.start_training(CONFIG, breast.train_ids, job_id="reset", alignment_id="both")
        fed.set_faults(Faults(reset_p=0.03, seed=11))
        final = client.wait("reset")
        fed.set_faults(Faults())
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
        resets = fed.stats()["a-b1"].resets
        shards = {n: read_shard(fed, n, "reset") for n in ("active", *SPLIT)}
    assert resets >= 3, f"only {resets} resets: the test did not exercise recovery"
    assert_plain_model(shards, breast.train_ids, CONFIG)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"VFL_PEERS": "b1=127.0.0.1:1"}, "VFL_PEERS: Value error, expected two or more passive parties"),
        ({"VFL_PEERS": "b1=127.0.0.1:1,b1=127.0.0.1:2"}, "passive party 'b1' given twice"),
        ({"VFL_PEERS": "b1=127.0.0.1:1,b2"}, "expected name=host:port entries"),
        ({"VFL_PEERS": "b1=127.0.0.1:1,active=127.0.0.1:2"}, "'active' is A's own name"),
        (
            {"VFL_PEERS": "b1=127.0.0.1:1,b2=127.0.0.1:2", "VFL_PEER_ADDRESS": "127.0.0.1:3"},
            "VFL_PEERS: set it or VFL_PEER_ADDRESS, not both",
        ),
        (
            {"VFL_PEERS": "b1=127.0.0.1:1,b2=127.0.0.1:2", "VFL_ASSISTANT_ADDRESS": "127.0.0.1:3"},
            "VFL_ASSISTANT_ADDRESS: not served with VFL_PEERS yet",
        ),
    ],
)
def test_bad_peers_settings_stop_the_active_party_with_one_line(tmp_path: Path, env: dict, expected: str) -> None:
    base = {"VFL_DATA_CSV": str(BUNDLED_ACTIVE), "VFL_DATA_DIR": str(tmp_path / "d"), "VFL_INSECURE": "true"}
    result = run_service("vfl.services.active", {**base, **env}, tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error")]
    assert len(lines) == 1 and expected in lines[0], result.stderr
