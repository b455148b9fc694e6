"""Storage that defends itself, end to end: real services (each its own
process) over real gRPC, files damaged on disk as a bad disk or a crash
would leave them.

- A damaged model shard (at A, at B) is named, quarantined and refused with
  DATA_LOSS; the other models list and predict as before; the service keeps
  serving.
- A damaged checkpoint found when A (or B) restarts fails its job visibly at
  A with the reason; B releases the job and both parties' jobs/ are clean.
- A damaged private key stops the service at start-up: one line, exit 2.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import make_federation
from tests.test_storage import damage
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.common.crypto import get_backend
from vfl.common.crypto.keystore import KEY_FILE, load_or_create_keypair
from vfl.common.healthcheck import check
from vfl.common.jobconfig import JobConfig
from vfl.v1 import client_pb2

ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIG = JobConfig(epochs=1, batch_size=64, seed=3)  # 7 iterations
JOB_CONFIG = JobConfig(epochs=30, batch_size=64, seed=5)  # 210 iterations: long enough to kill mid-job
STAMP = r"\d{8}T\d{6}\.\d{6}Z"


def data_dir(fed: LocalFederation, party: str) -> Path:
    return fed.workdir / party / "data"


def quarantined(fed: LocalFederation, party: str, name: str) -> list[Path]:
    qdir = data_dir(fed, party) / "quarantine"
    return sorted(p for p in qdir.glob(f"{name}.*") if re.fullmatch(STAMP, p.name.removeprefix(f"{name}.")))


def job_files(fed: LocalFederation, party: str, job_id: str) -> list[str]:
    jobs = data_dir(fed, party) / "jobs"
    return sorted(p.name for p in [*jobs.glob(f"{job_id}.*"), *jobs.glob(f".{job_id}.*")])


def client_for(fed: LocalFederation) -> VflClient:
    c = VflClient(fed.active_address, timeout_s=60)
    c.wait_ready(30)
    return c


def serving(fed: LocalFederation, party: str) -> bool:
    ok, line = check(fed.services[party].address, 5.0)
    return ok


def data_loss(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()
    return str(info.value.details())


# --- model shards -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, breast):
    """A federation with three stored models and each one's predictions."""
    with make_federation(tmp_path_factory.mktemp("shards")) as fed:
        before = {}
        with client_for(fed) as c:
            for m in ("m1", "m2", "m3", "m4"):
                c.start_training(MODEL_CONFIG, breast.train_ids, m)
                assert c.wait(m).state == client_pb2.JOB_STATE_SUCCEEDED
                before[m] = c.predict(m, breast.test_ids)
        yield fed, before


def test_damaged_shard_at_active(trained, breast):
    fed, before = trained
    damage(data_dir(fed, "active") / "models" / "m2.json", "flipped")
    with client_for(fed) as c:
        assert [m.model_id for m in c.list_models()] == ["m1", "m3", "m4"]
        (moved,) = quarantined(fed, "active", "m2.json")
        assert not (data_dir(fed, "active") / "models" / "m2.json").exists()
        # Found by the listing: quarantined there; Predict says where it went.
        assert data_loss(lambda: c.predict("m2", breast.test_ids)) == (
            f"model 'm2': models/m2.json was damaged and moved to quarantine/{moved.name}"
        )
        for m in ("m1", "m3", "m4"):
            np.testing.assert_array_equal(c.predict(m, breast.test_ids), before[m])
    assert "event=file_quarantined path=models/m2.json" in fed.services["active"].log_path.read_text()
    assert serving(fed, "active") and serving(fed, "passive")


def test_damaged_shard_found_by_predict_at_active(trained, breast):
    fed, before = trained
    damage(data_dir(fed, "active") / "models" / "m3.json", "truncated")
    with client_for(fed) as c:
        message = data_loss(lambda: c.predict("m3", breast.test_ids))
        (moved,) = quarantined(fed, "active", "m3.json")
        assert message == (
            f"model 'm3': models/m3.json is damaged (truncated: the JSON ends early); moved to quarantine/{moved.name}"
        )
        assert "m3" not in [m.model_id for m in c.list_models()]
        np.testing.assert_array_equal(c.predict("m1", breast.test_ids), before["m1"])
    assert serving(fed, "active")


def test_damaged_shard_at_passive(trained, breast):
    fed, before = trained
    damage(data_dir(fed, "passive") / "models" / "m4.json", "flipped")
    with client_for(fed) as c:
        # A's listing is A's shards: m4 is still listed; B refuses to score it, saying why.
        assert "m4" in [m.model_id for m in c.list_models()]
        message = data_loss(lambda: c.predict("m4", breast.test_ids))
        (moved,) = quarantined(fed, "passive", "m4.json")
        assert message == (
            "passive party refused PredictScores: model 'm4': models/m4.json is damaged (checksum mismatch); "
            f"moved to quarantine/{moved.name}"
        )
        assert data_loss(lambda: c.predict("m4", breast.test_ids)) == (
            "passive party refused PredictScores: model 'm4': models/m4.json was damaged and moved to "
            f"quarantine/{moved.name}"
        )
        np.testing.assert_array_equal(c.predict("m1", breast.test_ids), before["m1"])
    assert not (data_dir(fed, "passive") / "models" / "m4.json").exists()
    assert "event=file_quarantined path=models/m4.json" in fed.services["passive"].log_path.read_text()
    assert serving(fed, "active") and serving(fed, "passive")


# --- checkpoints ----------------------------------------------------------------


def wait_iteration(c: VflClient, job_id: str, at_least: int) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        status = c.status(job_id)
        assert status.state == client_pb2.JOB_STATE_RUNNING, status.error
        if status.iteration >= at_least:
            return
        time.sleep(0.01)
    raise AssertionError("training did not reach the kill point")


def wait_ended(fed: LocalFederation, job_id: str, timeout_s: float = 120.0) -> client_pb2.JobStatus:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with client_for(fed) as c:
            status = c.status(job_id)
        if status.state != client_pb2.JOB_STATE_RUNNING:
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still running after {timeout_s} s")


def wait_released(fed: LocalFederation, job_id: str, timeout_s: float = 30.0) -> None:
    """Both parties' jobs/ empty of the job (B releases it when A's abort arrives)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not job_files(fed, "active", job_id) and not job_files(fed, "passive", job_id):
            return
        time.sleep(0.1)
    raise AssertionError(
        f"stale checkpoint files: A {job_files(fed, 'active', job_id)}, B {job_files(fed, 'passive', job_id)}"
    )


def kill(fed: LocalFederation, party: str) -> None:
    proc = fed.services[party].proc
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def same_id_trains_again(fed: LocalFederation, breast, job_id: str) -> None:  # type: ignore[no-untyped-def]
    """A restarted A has forgotten the failed job; B must have released it,
    else it refuses the id (ALREADY_EXISTS)."""
    fed.services["active"].stop()
    fed.start("active")
    with client_for(fed) as c:
        c.start_training(MODEL_CONFIG, breast.train_ids, job_id)
        status = c.wait(job_id)
        assert status.state == client_pb2.JOB_STATE_SUCCEEDED, status.error


@pytest.mark.parametrize(
    ("part", "how", "reason"), [("state", "flipped", "checksum mismatch"), ("setup", "empty", "empty file")]
)
def test_damaged_checkpoint_at_active_restart(tmp_path, breast, part, how, reason):
    with make_federation(tmp_path) as fed:
        with client_for(fed) as c:
            c.start_training(JOB_CONFIG, breast.train_ids, "J")
            wait_iteration(c, "J", 5)
        kill(fed, "active")
        damage(data_dir(fed, "active") / "jobs" / f"J.{part}.json", how)
        fed.start("active")
        with client_for(fed) as c:
            status = c.status("J")
            events = list(c.watch("J"))
        (moved,) = quarantined(fed, "active", f"J.{part}.json")
        expected = (
            f"job J: checkpoint jobs/J.{part}.json is damaged ({reason}); moved to quarantine/{moved.name}; "
            "the job cannot resume"
        )
        assert status.state == client_pb2.JOB_STATE_FAILED and status.error == expected
        assert events[-1].state == client_pb2.JOB_STATE_FAILED and events[-1].message == expected
        wait_released(fed, "J")
        b_log = fed.services["passive"].log_path.read_text()
        assert "event=job_ended job=J" in b_log and "reason=aborted by the active party" in b_log
        same_id_trains_again(fed, breast, "J")
        assert serving(fed, "passive")


def test_damaged_checkpoint_at_passive_restart(tmp_path, breast):
    with make_federation(tmp_path) as fed:
        with client_for(fed) as c:
            c.start_training(JOB_CONFIG, breast.train_ids, "J")
            wait_iteration(c, "J", 5)
        kill(fed, "passive")
        damage(data_dir(fed, "passive") / "jobs" / "J.state.json", "flipped")
        time.sleep(0.3)
        fed.start("passive")  # same port, same data directory
        status = wait_ended(fed, "J")
        (moved,) = quarantined(fed, "passive", "J.state.json")
        assert status.state == client_pb2.JOB_STATE_FAILED
        assert status.error == (
            "passive party refused GetJobState: job J: checkpoint jobs/J.state.json is damaged (checksum mismatch); "
            f"moved to quarantine/{moved.name}; the job cannot resume"
        )
        wait_released(fed, "J")
        assert "event=job_not_restored job=J" in fed.services["passive"].log_path.read_text()
        same_id_trains_again(fed, breast, "J")


# --- the private key ---------------------------------------------------------------


def run_service(module: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", module], env=full, capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize("module", ["vfl.services.passive", "vfl.services.active"])
def test_truncated_key_file_stops_the_service_with_one_line(tmp_path, module):
    data = tmp_path / "d"
    load_or_create_keypair(data, get_backend("ou"), 1024, test_mode=True)
    key_file = data / KEY_FILE
    damage(key_file, "truncated")
    before = key_file.read_bytes()
    csv = "breast_hetero_host.csv" if module == "vfl.services.passive" else "breast_hetero_guest.csv"
    env = {
        "VFL_DATA_CSV": str(ROOT / "data" / csv),
        "VFL_DATA_DIR": str(data),
        "VFL_KEY_BITS": "1024",
        "VFL_TEST_MODE": "true",
        "VFL_INSECURE": "true",
        "VFL_BACKEND": "ou",
        "VFL_PEER_ADDRESS": "127.0.0.1:1",
        "VFL_ASSISTANT_ADDRESS": "",
        "VFL_PORT": "0",
    }
    result = run_service(module, env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"config error: VFL_DATA_DIR: {data}: keys/private_key.json is damaged (truncated: the JSON ends early); "
        "the models trained with this party's key need it: restore the file from a backup, or move it away to "
        "have a new key generated"
    ]
    # Left where it is: no new key over it, nothing moved.
    assert key_file.read_bytes() == before and not (data / "quarantine").exists()
