"""The expected time to finish (JobStatus.eta_s, JobEvent.eta_s): A's
estimate from the pace of its latest iterations, over real gRPC."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import make_federation
from vfl.cli.client import VflClient
from vfl.cli.main import BUNDLED_ACTIVE, format_eta, split_ids
from vfl.common.jobconfig import JobConfig
from vfl.services.active.jobs import ETA_WINDOW, State, TrainingJob
from vfl.v1 import client_pb2


def test_eta_is_the_recent_pace_times_the_iterations_left() -> None:
    job = TrainingJob("j", JobConfig(), total=100)
    assert job.eta_s() is None, "no pace before two iterations"
    job.marks.extend([(10, 100.0), (20, 110.0)])
    job.iteration = 20
    # 1 s per iteration, 80 to go, the last one 2 s ago.
    assert job.eta_s(now=112.0) == pytest.approx(78.0)
    assert job.eta_s(now=500.0) == 0.0
    job.state = State.SUCCEEDED
    assert job.eta_s(now=112.0) is None


def test_the_window_follows_the_latest_iterations() -> None:
    job = TrainingJob("j", JobConfig(), total=1000)
    for i in range(ETA_WINDOW + 12):
        job.iteration = i
        job.marks.append((i, 10.0 * i if i < 10 else 100.0 + (i - 10)))  # slow at first, then 1 s each
    job.iteration = ETA_WINDOW + 11
    last = job.marks[-1][1]
    assert job.eta_s(now=last) == pytest.approx(1000 - job.iteration)


def test_format_eta() -> None:
    assert format_eta(42.4) == "0:42"
    assert format_eta(3725) == "1:02:05"


def test_watch_and_status_carry_an_estimate_that_matches_the_pace(tmp_path: Path) -> None:
    train, _, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    config = JobConfig(epochs=4, batch_size=64, seed=3, learning_rate=0.1)
    seen: list[tuple[float, client_pb2.JobEvent]] = []
    with make_federation(tmp_path, assistant=False) as fed, VflClient(fed.active_address, timeout_s=60) as c:
        c.wait_ready(30)
        job = c.start_training(config, train, "eta")
        final = c.wait(job.job_id, lambda ev: seen.append((time.monotonic(), ev)))
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED
        assert not final.HasField("eta_s"), "a finished job has no estimate"
    running = [(t, ev) for t, ev in seen if ev.state == client_pb2.JOB_STATE_RUNNING and ev.iteration > 0]
    assert len(running) > 10
    with_eta = [(t, ev) for t, ev in running if ev.HasField("eta_s")]
    assert len(with_eta) >= len(running) - 2, "every event after the second iteration has an estimate"
    (t0, e0), (t1, e1) = running[len(running) // 4], running[-2]
    pace = (t1 - t0) / (e1.iteration - e0.iteration)  # as the client saw the iterations arrive
    for _, ev in with_eta[len(with_eta) // 4 :]:
        left = ev.total_iterations - ev.iteration
        assert ev.eta_s <= 4 * pace * left + 0.5, (ev.iteration, ev.eta_s, pace)
        assert ev.eta_s >= pace * left / 4 - 0.5, (ev.iteration, ev.eta_s, pace)
