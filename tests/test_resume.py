"""Jobs survive a party's death: each of A, B and C in turn is killed with
SIGKILL in the middle of training (each party its own process) and restarted;
the job resumes by itself from the checkpoints and ends with the same model
as an uninterrupted run of the same job (masks cancel exactly, so "the same"
is to the last bit of the fixed-point arithmetic). Both runs draw their
initial weights from each party's own test-mode seed (VFL_TEST_INITIAL_WEIGHTS_SEED):
in production they are private random draws."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from tests.conftest import SAME_START, make_federation, read_shard
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.common.jobconfig import JobConfig
from vfl.v1 import client_pb2

# Adam with a decaying rate: each party's optimiser state (moments, step
# count) must come back from its own checkpoint for the model to be the same.
CONFIG = JobConfig(
    epochs=25, batch_size=64, seed=5, loss_every=3, optimizer="adam", learning_rate=0.02, lr_decay="inverse_time"
)
KILL_AT = 25  # iterations done before the kill (of 175)


def client_for(fed: LocalFederation) -> VflClient:
    c = VflClient(fed.active_address, timeout_s=60)
    c.wait_ready(30)
    return c


def wait_done(fed: LocalFederation, job_id: str, timeout_s: float = 180.0) -> client_pb2.JobStatus:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with client_for(fed) as c:
            status = c.status(job_id)
        if status.state != client_pb2.JOB_STATE_RUNNING:
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still running after {timeout_s} s")


def wait_iteration(client: VflClient, job_id: str, at_least: int) -> int:
    deadline = time.time() + 60
    while time.time() < deadline:
        status = client.status(job_id)
        assert status.state == client_pb2.JOB_STATE_RUNNING, "the job ended before the kill"
        if status.iteration >= at_least:
            return int(status.iteration)
        time.sleep(0.01)
    raise AssertionError("training did not reach the kill point")


def weights(fed: LocalFederation, job_id: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = read_shard(fed, "active", job_id), read_shard(fed, "passive", job_id)
    return np.r_[a["weights"], a["intercept"]], np.asarray(b["weights"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, breast) -> tuple[np.ndarray, np.ndarray]:
    with make_federation(tmp_path_factory.mktemp("whole"), extra_env=SAME_START) as fed:
        with client_for(fed) as c:
            c.start_training(CONFIG, breast.train_ids, "resume")
            assert c.wait("resume").state == client_pb2.JOB_STATE_SUCCEEDED
        return weights(fed, "resume")


@pytest.mark.parametrize("victim", ["passive", "active", "assistant"])
def test_job_survives_sigkill_of_each_party(tmp_path, breast, uninterrupted, victim):
    with make_federation(tmp_path, extra_env=SAME_START) as fed:
        with client_for(fed) as c:
            c.start_training(CONFIG, breast.train_ids, "resume")
            killed_at = wait_iteration(c, "resume", KILL_AT)
        proc = fed.services[victim].proc
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.3)
        fed.start(victim)  # same port, same data directory
        status = wait_done(fed, "resume")
        assert status.state == client_pb2.JOB_STATE_SUCCEEDED, status.error
        assert status.iteration == 175 > killed_at
        w_a, w_b = weights(fed, "resume")
        # Bit-for-bit the uninterrupted model: nothing was applied twice or skipped.
        np.testing.assert_array_equal(w_a, uninterrupted[0])
        np.testing.assert_array_equal(w_b, uninterrupted[1])
        logs = {name: fed.services[name].log_path.read_text() for name in ("active", "passive")}
        if victim == "passive":
            assert "event=job_restored" in logs["passive"]
        if victim == "active":
            assert "resumed" in logs["active"] or "event=job_resumed" in logs["active"]
        if victim != "active":
            assert "event=peer_lost" in logs["active"] and "event=job_resumed" in logs["active"]
        # Checkpoints are gone once the job has ended.
        for party in ("active", "passive"):
            assert not list((fed.workdir / party / "data" / "jobs").glob("resume.*"))


def test_sigterm_drains_and_exits_cleanly(tmp_path, breast):
    with make_federation(tmp_path) as fed:
        svc = fed.services["passive"]
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=15) == 0
        assert "event=stopping" in svc.log_path.read_text()
