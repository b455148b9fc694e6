"""Linear regression on the same protocol (residual u - y, squared loss),
end to end over real gRPC with each party in its own process: the weights
are the plain-numpy run's, prediction returns the value, the reported loss
is the plain squared loss, and the fit reaches least squares'."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from tests.conftest import make_federation, read_shard, write_csv
from tests.reference_run import reference_from_shards
from vfl.cli.client import VflClient
from vfl.common.jobconfig import JobConfig
from vfl.v1 import client_pb2

CONFIG = JobConfig(model="linear", epochs=25, batch_size=32, learning_rate=0.1, l2=0.0, seed=3, tol=0.0)


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    """y = X_A w_A + X_B w_B + 3 + noise over ids of which A and B share 240;
    each side also holds ids the other lacks."""
    rng = np.random.default_rng(11)
    n = 300
    ids = [f"cust-{k:04d}" for k in range(n)]
    xa, xb = rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5], rng.normal(size=(n, 4))
    y = xa @ [1.5, -0.7, 2.0] + xb @ [0.8, 0.0, -1.2, 0.4] + 3.0 + 0.3 * rng.normal(size=n)
    d = tmp_path_factory.mktemp("linear")
    a_rows = range(0, 270)  # A: 0..269, B: 30..299; shared 30..269
    b_rows = range(30, n)
    active = write_csv(d / "active.csv", ["id", "y", "a1", "a2", "a3"], [[ids[k], y[k], *xa[k]] for k in a_rows])
    passive = write_csv(d / "passive.csv", ["id", "b1", "b2", "b3", "b4"], [[ids[k], *xb[k]] for k in b_rows])
    shared = ids[30:270]
    with make_federation(d / "fed", active_csv=active, passive_csv=passive) as fed:
        yield fed, active, passive, shared, xa, xb, y


def test_linear_regression_matches_plain_numpy_and_least_squares(regression):
    fed, active, passive, shared, xa, xb, y = regression
    with VflClient(fed.active_address, timeout_s=120) as client:
        client.wait_ready(30)
        aligned = client.align()
        assert aligned.size == len(shared)
        train_ids, test_ids = shared[:192], shared[192:]
        client.start_training(CONFIG, train_ids, "lin", alignment_id=aligned.alignment_id, holdout_ids=test_ids)
        final = client.wait("lin")
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
        a, b = read_shard(fed, "active", "lin"), read_shard(fed, "passive", "lin")
        ref = reference_from_shards(a, b, CONFIG, train_ids, active_csv=active, passive_csv=passive)
        assert final.iteration == len(ref.batches)
        w_a = np.r_[a["weights"], a["intercept"]]
        np.testing.assert_allclose(w_a, ref.w_active, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b["weights"], ref.w_passive, rtol=1e-4, atol=1e-6)
        # Prediction returns the value u itself (no sigmoid), as the plain model does.
        values = client.predict("lin", test_ids)
        np.testing.assert_allclose(values, ref.predict(test_ids), rtol=0, atol=1e-5)
        assert values.min() < 0 or values.max() > 1  # not squashed into a probability
        # The reported loss is the plain squared loss of the last batch.
        last = ref.trace[-1]
        rows = ref.batches[-1].rows
        residual = last["a"] + last["b"]
        assert final.loss == pytest.approx(float(np.mean(residual**2) / 2), rel=1e-5)
    # The fit reaches ordinary least squares' on the held-out ids.
    pos = {f"cust-{k:04d}": k for k in range(len(y))}
    tr, te = [pos[i] for i in train_ids], [pos[i] for i in test_ids]
    joined = np.hstack([xa, xb])
    ols = LinearRegression().fit(joined[tr], y[tr])
    r2_ols = r2_score(y[te], ols.predict(joined[te]))
    r2_fed = r2_score(y[te], values)
    assert r2_fed > 0.95
    assert r2_fed > r2_ols - 0.01, (r2_fed, r2_ols)
    assert rows.size  # the last batch was not empty


def test_logistic_on_numeric_labels_is_refused_with_the_field(regression):
    fed, *_ = regression
    with VflClient(fed.active_address, timeout_s=120) as client:
        client.wait_ready(30)
        with pytest.raises(grpc.RpcError) as err:
            client.start_training(JobConfig(), job_id="logit-on-numbers")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details().startswith("config.model: logistic regression needs 0/1 labels")
        # The service stays up: it still answers, with the alignment stored.
        assert client.list_alignments()
