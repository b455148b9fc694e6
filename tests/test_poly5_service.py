"""The polynomial residual as a per-job choice (`config.residual = "poly5"`,
docs/POLY5.md) through the services: A and B each the real service in its
own process, mutual TLS, B with its default policy. A runs such a job
through its protocol session with one PartyServicePort (step 0 is
ExchangeScorePowers), B through its PassiveSession; both store weights
equal to the plain-numpy run with the same polynomial, and Predict returns
the model's probabilities. What poly5 does not serve is refused naming the
field."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from tests.attacks.harness import active_view, passive_features
from tests.conftest import TEST_KEY_BITS, BreastSplit, read_shard, tls_client
from tests.reference_run import assert_weights_close
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common.data import load_party_csv
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.batching import Batch, batch_schedule, min_batch_size
from vfl.common.protocol.reference import train_plain
from vfl.common.protocol.residual import POLY5
from vfl.common.protocol.sessions import TrainingPlan
from vfl.v1 import client_pb2

CONFIG = JobConfig(
    batch_size=64,
    epochs=2,
    seed=9,
    loss_every=0,
    max_iterations=12,
    residual="poly5",
    optimizer="adam",
    learning_rate=0.05,
)


def test_a_poly5_job_through_the_services_is_the_plain_poly5_model(tmp_path: Path, breast: BreastSplit) -> None:
    fed = LocalFederation(tmp_path / "fed", BUNDLED_ACTIVE, BUNDLED_PASSIVE, key_bits=TEST_KEY_BITS, assistant=False)
    with fed, tls_client(fed) as client:
        client.wait_ready(30)
        assert client.align(alignment_id="all").state == client_pb2.ALIGNMENT_STATE_SUCCEEDED
        client.start_training(CONFIG, breast.train_ids, job_id="p5", holdout_ids=breast.test_ids, alignment_id="all")
        final = client.wait("p5")
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
        probabilities = client.predict("p5", breast.test_ids)
        (info,) = client.list_models()
        shards = {n: read_shard(fed, n, "p5") for n in ("active", "passive")}
    assert info.config.residual == "poly5"
    view = active_view(breast.train_ids)
    joined = passive_features(breast.train_ids)
    floor = min_batch_size(view.x.shape[1] - 1, joined.shape[1], False)
    schedule = batch_schedule(
        len(breast.train_ids), CONFIG.batch_size, CONFIG.epochs, CONFIG.seed, floor, CONFIG.max_iterations
    )
    a, b = shards["active"], shards["passive"]
    w_a, w_b = train_plain(
        view.x[:, :-1],
        joined,
        view.y,
        np.asarray(a["initial_weights"]),
        np.asarray(b["initial_weights"]),
        [Batch(s.epoch, s.rows) for s in schedule],
        TrainingPlan.of(CONFIG).optimizer,
        CONFIG.l2,
        model=POLY5,
    )
    assert TrainingPlan.of(CONFIG).model is POLY5
    assert_weights_close(np.r_[a["weights"], a["intercept"]], w_a)
    assert_weights_close(np.asarray(b["weights"]), w_b)
    assert np.linalg.norm(np.r_[a["weights"], a["intercept"]] - a["initial_weights"]) > 0.05
    # The plain Taylor run ends elsewhere: the job did run the polynomial.
    w_taylor, _ = train_plain(
        view.x[:, :-1],
        joined,
        view.y,
        np.asarray(a["initial_weights"]),
        np.asarray(b["initial_weights"]),
        [Batch(s.epoch, s.rows) for s in schedule],
        TrainingPlan.of(CONFIG).optimizer,
        CONFIG.l2,
    )
    assert np.max(np.abs(w_taylor - w_a)) > 1e-3
    # Predict: sigmoid of the model's score, from both shards.
    active = load_party_csv(BUNDLED_ACTIVE, "id", "y")
    passive = load_party_csv(BUNDLED_PASSIVE, "id")
    xa = (active.features[active.positions(breast.test_ids, "ids")] - a["scaler"]["mean"]) / a["scaler"]["scale"]
    xb = (passive.features[passive.positions(breast.test_ids, "ids")] - b["scaler"]["mean"]) / b["scaler"]["scale"]
    u = xa @ np.asarray(a["weights"]) + a["intercept"] + xb @ np.asarray(b["weights"])
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-u)), atol=1e-6)


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"loss_every": 1}, "loss_every"),
        ({"model": "linear"}, "residual"),
        ({"validation_every": 5}, "validation_every"),
        ({"dp_epsilon": 1.0}, "dp_epsilon"),
    ],
)
def test_what_poly5_does_not_serve_is_refused_naming_the_field(update: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        JobConfig.model_validate({**CONFIG.model_dump(), **update})


def test_a_poly5_job_with_validation_is_refused_over_grpc(tmp_path: Path, breast: BreastSplit) -> None:
    """The same rule reached through StartTraining: INVALID_ARGUMENT naming the field."""
    fed = LocalFederation(tmp_path / "fed", BUNDLED_ACTIVE, BUNDLED_PASSIVE, key_bits=TEST_KEY_BITS, assistant=False)
    with fed, tls_client(fed) as client:
        client.wait_ready(30)
        request = client_pb2.StartTrainingRequest(job_id="bad", train_ids=breast.train_ids, alignment_id="none")
        request.config.residual = "poly5"
        request.config.loss_every = 1
        with pytest.raises(grpc.RpcError) as info:
            client.stub.StartTraining(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "loss_every" in info.value.details() and "poly5" in info.value.details()
