"""CancelJob and ListJobs over real gRPC, each party in its own process: a
cancelled job stops before its next iteration, neither party keeps a model
or a checkpoint of it, and both services stay SERVING and train again."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.conftest import make_federation, tls_client
from tests.test_errors import assert_serving
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, split_ids
from vfl.common import healthcheck
from vfl.common.jobconfig import JobConfig
from vfl.common.tls import TlsConfig
from vfl.v1 import client_pb2


def _files_of(
    fed: LocalFederation, job_id: str, names: tuple[str, ...] = ("active", "passive")
) -> dict[str, list[str]]:
    """Every file named after the job under each party's data directory."""
    return {
        name: sorted(str(p.relative_to(fed.workdir)) for p in (fed.workdir / name / "data").rglob(f"{job_id}*"))
        for name in names
    }


def test_a_cancelled_job_leaves_nothing_at_either_party(tmp_path: Path) -> None:
    train, test, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    long_job = JobConfig(epochs=50, batch_size=64, seed=5, learning_rate=0.1)
    with make_federation(tmp_path) as fed, VflClient(fed.active_address, timeout_s=120) as c:
        c.wait_ready(30)
        status = c.start_training(long_job, train, "to-cancel", holdout_ids=test)
        events = c.watch(status.job_id)
        during: dict[str, list[str]] = {}
        for ev in events:
            if ev.iteration >= 3:
                during = _files_of(fed, status.job_id)
                break
        # The job checkpoints at both parties while it runs: "nothing after" means something.
        assert during["active"] and during["passive"], during
        final = c.cancel(status.job_id)
        assert final.state == client_pb2.JOB_STATE_CANCELLED, final
        assert 3 <= final.iteration < final.total_iterations
        assert "cancelled" in final.error
        rest = list(events)
        assert rest and rest[-1].state == client_pb2.JOB_STATE_CANCELLED, "the watch stream ends CANCELLED"

        assert _files_of(fed, status.job_id) == {"active": [], "passive": []}
        assert all(m.model_id != status.job_id for m in c.list_models())
        with pytest.raises(grpc.RpcError) as info:
            c.predict(status.job_id, test[:3])
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert_serving(fed, "active", "passive", "assistant")

        with pytest.raises(grpc.RpcError) as info:
            c.cancel(status.job_id)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already ended (cancelled)" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            c.cancel("no-such-job")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        # Both parties train again.
        again = c.wait(c.start_training(JobConfig(epochs=1, batch_size=64, seed=5), train, "after").job_id)
        assert again.state == client_pb2.JOB_STATE_SUCCEEDED, again.error
        jobs = c.list_jobs()
        assert [(j.job_id, j.state) for j in jobs] == [
            ("to-cancel", client_pb2.JOB_STATE_CANCELLED),
            ("after", client_pb2.JOB_STATE_SUCCEEDED),
        ]
        assert jobs[0].iteration == final.iteration


def test_cancel_with_two_passive_parties(tmp_path: Path) -> None:
    """The coalition job (VFL_PEERS): every passive party drops the job."""
    from tests.test_active_service_parties import two_passive_federation

    train, _, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    names = ("active", "b1", "b2")
    with two_passive_federation(tmp_path) as fed, tls_client(fed) as c:
        c.wait_ready(30)
        status = c.start_training(JobConfig(epochs=50, batch_size=64, seed=5), train, "k-cancel")
        events = c.watch(status.job_id)
        during: dict[str, list[str]] = {}
        for ev in events:
            if ev.iteration >= 2:
                during = _files_of(fed, status.job_id, names)
                break
        # A's running marker, each B's checkpoint: "nothing after" means something.
        assert all(during[n] for n in names), during
        final = c.cancel(status.job_id)
        assert final.state == client_pb2.JOB_STATE_CANCELLED and final.iteration < final.total_iterations
        assert _files_of(fed, status.job_id, names) == {n: [] for n in names}
        for name in ("b1", "b2"):
            assert not (fed.workdir / name / "data" / "models" / f"{status.job_id}.json").exists()
        assert all(m.model_id != status.job_id for m in c.list_models())
        files = fed.tls_files("client")
        assert files is not None
        for name in names:
            assert fed.services[name].proc.poll() is None, f"{name} exited"
            ok, line = healthcheck.check(fed.services[name].address, 10, TlsConfig.load(files))
            assert ok, line
