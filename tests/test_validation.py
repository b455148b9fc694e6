"""Early stopping on a validation split held by A, over real gRPC with each
party in its own process: the validation losses are the plain-numpy run's
losses of the same weights on the holdout rows, the job stops after
`patience` checks without improvement, and both parties keep the weights
of the best check (each its own)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.conftest import read_shard
from tests.reference_run import ReferenceRun, assert_weights_close, reference_from_shards
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.reference import with_intercept
from vfl.v1 import client_pb2


def plain_validation(ref: ReferenceRun, holdout: list[str]) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[float]]:
    """w^t for t = 0..T (w^t: after t updates) and the loss of each on the holdout rows."""
    xa = with_intercept(ref.scaler_a.transform(ref.active.features[ref.active.positions(holdout, "ids")]))
    xb = ref.scaler_b.transform(ref.passive.features[ref.passive.positions(holdout, "ids")])
    y = ref.active.labels[ref.active.positions(holdout, "ids")]
    weights = [(tr["w_active"], tr["w_passive"]) for tr in ref.trace] + [(ref.w_active, ref.w_passive)]
    return weights, [ref.model.plain_loss(xa @ a + xb @ b, y) for a, b in weights]


def run(client, config: JobConfig, breast, job_id: str) -> client_pb2.JobStatus:
    client.start_training(config, breast.train_ids, job_id, holdout_ids=breast.test_ids)
    final = client.wait(job_id)
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
    return final


def kept_weights(federation, job_id: str) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    a, b = read_shard(federation, "active", job_id), read_shard(federation, "passive", job_id)
    return a, b, np.r_[a["weights"], a["intercept"]], np.asarray(b["weights"])


def test_patience_stops_the_job_and_both_keep_the_best_check(federation, client, breast):
    config = JobConfig(epochs=5, batch_size=64, learning_rate=0.15, seed=7, validation_every=1, patience=2)
    final = run(client, config, breast, "val-patience")
    a, b, w_a, w_b = kept_weights(federation, "val-patience")
    ref = reference_from_shards(a, b, config.model_copy(update={"patience": 0}), breast.train_ids)
    weights, losses = plain_validation(ref, breast.test_ids)
    # The plain run's stopping point under the same rule.
    best, stale, stop = 1, 0, None
    for t in range(2, len(losses)):
        if losses[t] < losses[best]:
            best, stale = t, 0
        else:
            stale += 1
            if stale >= 2:
                stop = t
                break
    assert stop is not None and stop < len(ref.batches), "the configuration must stop early"
    assert final.iteration == stop + 1 < len(ref.batches)  # the check at t runs in iteration t
    got = a["validation_losses"]
    assert [i for i, _ in got] == list(range(1, stop + 1))
    np.testing.assert_allclose([v for _, v in got], losses[1 : stop + 1], rtol=1e-6)
    assert final.best_iteration == a["kept_iteration"] == b["kept_iteration"] == best
    assert final.validation_loss == pytest.approx(losses[stop], rel=1e-6)
    assert_weights_close(w_a, weights[best][0])
    assert_weights_close(w_b, weights[best][1])
    # Not the last weights: those are further on.
    assert np.linalg.norm(w_b - weights[stop + 1][1]) > 1e-4


def test_checks_every_k_and_after_the_last_iteration(federation, client, breast):
    config = JobConfig(epochs=3, batch_size=64, learning_rate=0.15, seed=3, validation_every=5)
    final = run(client, config, breast, "val-every")
    a, b, w_a, w_b = kept_weights(federation, "val-every")
    ref = reference_from_shards(a, b, config, breast.train_ids)
    weights, losses = plain_validation(ref, breast.test_ids)
    total = len(ref.batches)
    assert final.iteration == total == 21
    checked = [5, 10, 15, 20, 21]
    assert [i for i, _ in a["validation_losses"]] == checked
    np.testing.assert_allclose([v for _, v in a["validation_losses"]], [losses[t] for t in checked], rtol=1e-6)
    best = min(checked, key=lambda t: losses[t])
    assert a["kept_iteration"] == b["kept_iteration"] == best
    assert_weights_close(w_a, weights[best][0])
    assert_weights_close(w_b, weights[best][1])


def test_validation_needs_holdout_rows(client, breast):
    with pytest.raises(grpc.RpcError) as err:
        client.start_training(JobConfig(validation_every=2), breast.train_ids, "val-no-holdout")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("config.validation_every: needs holdout_ids")
    # B refuses a split too small to validate on (one scalar over few rows).
    with pytest.raises(grpc.RpcError) as err:
        client.start_training(JobConfig(validation_every=2), breast.train_ids, "val-tiny", breast.test_ids[:5])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.validation_every: expected at least" in err.value.details()
