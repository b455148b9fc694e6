"""A's protocol session (vfl/common/protocol/sessions.py) drives the real
passive service over gRPC through `PartyServicePort`: B runs as its own
process with its default policy, the session in this process; the weights
both parties end with equal the plain-numpy run. The port is how the
services will run the sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.attacks.harness import MaliciousActive, attack_federation, passive_features
from tests.conftest import BreastSplit, read_shard
from tests.reference_run import assert_weights_close
from vfl.common.crypto import get_backend
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.batching import Batch
from vfl.common.protocol.reference import train_plain
from vfl.common.protocol.sessions import ActiveSession, PartyInfo, TrainingPlan
from vfl.services.active.peer import PartyServicePort

BACKEND = get_backend("ou")
CONFIG = JobConfig(
    batch_size=64, epochs=2, seed=11, loss_every=0, max_iterations=12, optimizer="adam", learning_rate=0.05
)


def test_active_session_trains_with_the_real_passive_service(tmp_path: Path, breast: BreastSplit) -> None:
    fed = attack_federation(tmp_path)
    fed.start("passive")
    try:
        key = BACKEND.generate_keypair(1024)
        a = MaliciousActive(fed.services["passive"].address, key, BACKEND, breast.train_ids)
        try:
            passive_key = a.exchange_keys()
            a.setup(CONFIG, job_id="session-over-grpc")
            port = PartyServicePort(a.client, a.job_id, a.fp, key.public, passive_key, a.p_passive)
            session = ActiveSession(
                BACKEND,
                key,
                a.view.x,
                a.view.y,
                a.w,
                TrainingPlan.of(CONFIG),
                [PartyInfo("passive", passive_key, a.p_passive)],
                {"passive": port},
            )
            assert a.schedule is not None
            batches = list(a.schedule)
            for t, batch in enumerate(batches):
                session.iteration(t, batch.rows.tolist())
            assert a.finish(len(batches), aborted=False)
        finally:
            a.close()
        shard = read_shard(fed, "passive", "session-over-grpc")
    finally:
        fed.stop()
    w_a, w_b = train_plain(
        a.view.x[:, :-1],
        passive_features(breast.train_ids),
        a.view.y,
        a.w,
        np.asarray(shard["initial_weights"]),
        [Batch(b.epoch, b.rows) for b in batches],
        TrainingPlan.of(CONFIG).optimizer,
        CONFIG.l2,
    )
    assert_weights_close(session.w, w_a)
    assert_weights_close(np.asarray(shard["weights"]), w_b)
    assert np.linalg.norm(session.w - a.w) > 0.05  # it learned
