"""The scikit-learn-style estimator over real gRPC, each party in its own
process: fit runs a federated job, predict_proba equals the CLI's
predictions of the same model, coef_ and intercept_ are A's part of it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve

from tests.conftest import make_federation
from vfl.cli.client import VflClient
from vfl.cli.main import BUNDLED_ACTIVE, ROOT, split_ids
from vfl.common.data import Scaler, load_party_csv
from vfl.common.storage import read_record
from vfl.estimator import FederatedLogisticRegression
from vfl.v1 import client_pb2


def _cli_predictions(address: str, model_id: str, ids: list[str], tmp: Path) -> dict[str, float]:
    ids_csv, out = tmp / "ids.csv", tmp / "pred.csv"
    ids_csv.write_text("id\n" + "".join(f"{i}\n" for i in ids))
    cmd = [sys.executable, "-m", "vfl.cli.main", "predict", model_id, "--ids-csv", str(ids_csv)]
    cmd += ["--address", address, "--insecure", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with out.open() as f:
        return {row["id"]: float(row["probability"]) for row in csv.DictReader(f)}


def test_fit_predict_proba_equals_the_cli(tmp_path: Path) -> None:
    train, test, labels = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    y_test = np.array([labels[i] for i in test])
    events: list[client_pb2.JobEvent] = []
    with make_federation(tmp_path, assistant=False) as fed:
        est = FederatedLogisticRegression(fed.active_address, insecure=True, epochs=3, batch_size=64, seed=4)
        assert est.fit(train, holdout_ids=test, callback=events.append) is est
        assert events and events[-1].state == client_pb2.JOB_STATE_SUCCEEDED
        assert est.n_iter_ == events[-1].iteration == events[-1].total_iterations

        proba = est.predict_proba(test)
        assert proba.shape == (len(test), 2)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
        cli = _cli_predictions(fed.active_address, est.model_id_, test, tmp_path)
        # The CLI writes 6 decimals: the estimator's probabilities round to them.
        np.testing.assert_allclose(proba[:, 1], [cli[i] for i in test], rtol=0, atol=5.1e-7)

        pred = est.predict(test)
        assert set(np.unique(pred)) <= {0, 1}
        np.testing.assert_array_equal(pred, (proba[:, 1] >= 0.5).astype(int))
        assert est.score(test, y_test) == pytest.approx(accuracy_score(y_test, pred))
        auc = roc_auc_score(y_test, proba[:, 1])
        assert auc > 0.95
        assert est.validation_auc_ == pytest.approx(auc, abs=1e-12), "A's holdout AUC is the same model's"
        fpr, tpr, _ = roc_curve(y_test, proba[:, 1])
        assert est.validation_ks_ == pytest.approx(max(tpr - fpr), abs=1e-12)
        # The same figures in GetJobStatus, ListModels and ListJobs.
        with VflClient(fed.active_address) as c:
            st = c.status(est.model_id_)
            assert (st.validation_auc, st.validation_ks) == (est.validation_auc_, est.validation_ks_)
            info = next(m for m in c.list_models() if m.model_id == est.model_id_)
            assert (info.validation_auc, info.validation_ks, info.holdout_rows) == (
                est.validation_auc_,
                est.validation_ks_,
                len(test),
            )
            assert c.list_jobs()[0].validation_ks == est.validation_ks_

        # coef_ and intercept_: A's part of the score on A's raw features, as A's shard has it.
        shard = read_record(fed.workdir / "active" / "data" / "models" / f"{est.model_id_}.json", "model")
        a = load_party_csv(BUNDLED_ACTIVE, "id", "y")
        x = a.features[a.positions(test, "ids")]
        u_shard = Scaler.from_dict(shard["scaler"]).transform(x) @ np.asarray(shard["weights"]) + shard["intercept"]
        np.testing.assert_allclose(x @ est.coef_[0] + est.intercept_[0], u_shard, rtol=1e-9, atol=1e-9)
        assert est.coef_.shape == (1, a.n_features)
        assert list(est.feature_names_in_) == a.feature_names

        # get_params / set_params / clone, as scikit-learn's tools expect.
        params = est.get_params()
        assert params["epochs"] == 3 and params["address"] == fed.active_address
        other = clone(est).set_params(epochs=1, seed=9)
        assert other.get_params()["epochs"] == 1 and not hasattr(other, "model_id_")
        with pytest.raises(AttributeError, match="not fitted"):
            other.predict_proba(test)
        other.fit(train)
        assert other.n_iter_ < est.n_iter_ and other.model_id_ != est.model_id_
        assert other.validation_auc_ is None and other.validation_ks_ is None, "no holdout, no figures"


def test_connection_options_are_checked() -> None:
    with pytest.raises(ValueError, match="tls_dir, insecure"):
        FederatedLogisticRegression("localhost:1").fit(["a"])
