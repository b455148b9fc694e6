"""A scikit-learn-style estimator for A's operator: `fit` runs a federated
training job through A's client API, like any other gRPC client.

The rows are named by A's ids, not given as features: each party's
features and A's labels stay at that party. So `X` is a sequence of A's
ids, `y` is not needed by `fit` (A holds the labels), and `coef_` and
`intercept_` are A's part of the model only (B's weights never leave B).

    from vfl.estimator import FederatedLogisticRegression
    model = FederatedLogisticRegression("localhost:50051", insecure=True, epochs=5)
    model.fit(train_ids, holdout_ids=test_ids, callback=print)
    model.predict_proba(test_ids)[:, 1]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from vfl.cli.client import STATE_NAMES, VflClient
from vfl.common.jobconfig import JobConfig, job_config
from vfl.common.tls import CLIENT_IDENTITY, TlsConfig, TlsFiles
from vfl.v1 import client_pb2

# A's limit of ids per Predict call.
PREDICT_CHUNK = 100_000

JobCallback = Callable[[client_pb2.JobEvent], None]


class FederatedLogisticRegression(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Federated logistic regression trained by the active party at `address`.

    Connection: `tls_dir` (the CA and `tls_name`'s certificate, see `vfl
    certs`), or `insecure=True` for services run with VFL_INSECURE=true.
    Training: the hyper-parameters of `vfl train`; `settings` takes any other
    TrainingConfig field by name. `alignment_id`: train on an existing
    alignment (empty: align all of A's ids with B's first).
    """

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        tls_dir: str | Path | None = None,
        tls_name: str = CLIENT_IDENTITY,
        server_name: str | None = None,
        insecure: bool = False,
        epochs: int = 5,
        batch_size: int = 64,
        learning_rate: float = 0.15,
        l2: float = 0.01,
        optimizer: str = "sgd",
        lr_decay: str = "none",
        seed: int = 42,
        dp_epsilon: float = 0.0,
        settings: Mapping[str, Any] | None = None,
        alignment_id: str = "",
        threshold: float = 0.5,
        timeout_s: float = 600.0,
    ) -> None:
        self.address = address
        self.tls_dir = tls_dir
        self.tls_name = tls_name
        self.server_name = server_name
        self.insecure = insecure
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.l2 = l2
        self.optimizer = optimizer
        self.lr_decay = lr_decay
        self.seed = seed
        self.dp_epsilon = dp_epsilon
        self.settings = settings
        self.alignment_id = alignment_id
        self.threshold = threshold
        self.timeout_s = timeout_s

    # --- scikit-learn API -------------------------------------------------

    def fit(
        self,
        X: Sequence[str],
        y: object = None,
        *,
        holdout_ids: Sequence[str] = (),
        job_id: str = "",
        callback: JobCallback | None = None,
    ) -> FederatedLogisticRegression:
        """Train on A's ids `X` (A's own labels; `y` is ignored). `holdout_ids`:
        ids to score but not train on (their AUC and KS land in
        `validation_auc_`, `validation_ks_`). `callback` gets every progress
        event. An interrupt (Ctrl-C, a notebook's stop button) cancels the
        job at both parties before it is raised."""
        config = self._config()
        ids = _ids(X, "X")
        with self._client() as client:
            status = client.start_training(
                config, ids, job_id, _ids(holdout_ids, "holdout_ids"), self.alignment_id or None
            )
            try:
                final = client.wait(status.job_id, callback)
            except KeyboardInterrupt:
                client.cancel(status.job_id)
                raise
            if final.state != client_pb2.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"job {final.job_id} {STATE_NAMES[final.state]}: {final.error}")
            detail = client.model(final.job_id)
        self.model_id_ = final.job_id
        self.job_status_ = final
        self.n_iter_ = final.iteration
        self.classes_ = np.array([0, 1])
        self.feature_names_in_ = np.array(list(detail.active_feature_names), dtype=object)
        self.n_features_in_ = len(detail.active_feature_names)
        # A's part of the linear score on A's raw features: u_A = x_A . coef_ + intercept_.
        self.coef_ = np.asarray(detail.active_weights, dtype=np.float64).reshape(1, -1)
        self.intercept_ = np.array([detail.active_intercept])
        info = detail.info
        self.validation_auc_ = info.validation_auc if info.HasField("validation_auc") else None
        self.validation_ks_ = info.validation_ks if info.HasField("validation_ks") else None
        self.loss_history_ = [(p.iteration, p.loss) for p in detail.loss_history]
        return self

    def predict_proba(self, X: Sequence[str]) -> np.ndarray:
        """(n, 2): P(y = 0) and P(y = 1) per id, scored by both parties' shards;
        rows of NaN where the passive party holds no row it scores."""
        p1 = self._scores(X)
        return np.column_stack([1.0 - p1, p1])

    def predict(self, X: Sequence[str]) -> np.ndarray:
        """1 where P(y = 1) >= threshold, else 0 (ids B does not score: ValueError)."""
        p1 = self._scores(X)
        if np.isnan(p1).any():
            raise ValueError(f"X: {int(np.isnan(p1).sum())} ids are not scored by the passive party")
        return (p1 >= self.threshold).astype(np.int64)

    # score(X, y): ClassifierMixin's accuracy of predict(X) against y.

    # --- helpers ----------------------------------------------------------

    def _config(self) -> JobConfig:
        fields: dict[str, Any] = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "l2": self.l2,
            "optimizer": self.optimizer,
            "lr_decay": self.lr_decay,
            "seed": self.seed,
            "model": "logistic",
        }
        if self.dp_epsilon:
            fields.update(dp_epsilon=self.dp_epsilon, loss_every=0)
        fields.update(self.settings or {})
        return job_config(**fields)

    def _client(self) -> VflClient:
        if self.insecure == (self.tls_dir is not None):
            raise ValueError(
                "tls_dir, insecure: give exactly one (tls_dir for mutual TLS, insecure=True for plaintext)"
            )
        tls = None if self.tls_dir is None else TlsConfig.load(TlsFiles.in_dir(Path(self.tls_dir), self.tls_name))
        return VflClient(self.address, self.timeout_s, tls, self.server_name)

    def _scores(self, X: Sequence[str]) -> np.ndarray:
        if not hasattr(self, "model_id_"):
            raise AttributeError("this FederatedLogisticRegression is not fitted yet: call fit first")
        ids = _ids(X, "X")
        with self._client() as client:
            parts = [
                client.predict(self.model_id_, ids[k : k + PREDICT_CHUNK]) for k in range(0, len(ids), PREDICT_CHUNK)
            ]
        return np.concatenate(parts) if parts else np.zeros(0)


def _ids(X: Sequence[str] | np.ndarray, what: str) -> list[str]:
    """A's ids from a list, a 1-d array, or one column (e.g. df[["id"]])."""
    arr = np.asarray(X, dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a sequence of ids (one column), got shape {arr.shape}")
    return [str(i) for i in arr]
