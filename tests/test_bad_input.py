"""What a user gets wrong and what a disk does wrong: one clear line each.

Start-up (each service its own process, as an operator starts it): a CSV that
is binary, not UTF-8, or has a bad cell; a taken port; an unknown backend; a
read-only data directory. Each exits 2 with exactly one `config error:` line
naming the option, the file, the line and column, and what was expected.

`vfl demo`: CSV paths relative to the caller's directory; a CSV with a header
only. Each is one `error:` line on stderr and exit code 2 (or, for relative
paths, a run that works).

A full disk (tmpfs data directories; needs root to mount, skipped otherwise)
at StartTraining and in the middle of a job, at A and at B: the caller gets
RESOURCE_EXHAUSTED naming the party and its directory, both parties release
the job and its files, the services keep SERVING, a stored model still
predicts the same, and the job id trains once there is room again.

Errors through the assistant name B's address: tests/test_errors.py
(test_passive_party_down_through_assistant_unavailable).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import TEST_KEY_BITS, BreastSplit, make_federation
from tests.test_errors import assert_refused, assert_serving
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common.data import load_party_csv
from vfl.common.errors import ConfigError
from vfl.common.jobconfig import job_config
from vfl.v1 import client_pb2

ROOT = Path(__file__).resolve().parent.parent
Code = grpc.StatusCode
HEADER = "id,y,x0,x1"


def csv_with(tmp_path: Path, name: str, body: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(body)
    return path


# --- CSV cells: the exact line for each kind of bad value -----------------------

BAD_CELLS = [
    ("abc", "line 3, column 'x1': expected a finite number, got 'abc'"),
    ("", "line 3, column 'x1': expected a finite number, got an empty cell"),
    ("nan", "line 3, column 'x1': expected a finite number, got 'nan', which is not finite"),
    ("-inf", "line 3, column 'x1': expected a finite number, got '-inf', which is not finite"),
]


@pytest.mark.parametrize(("cell", "expected"), BAD_CELLS, ids=["text", "empty", "nan", "inf"])
def test_bad_feature_cell_named_by_line_and_column(tmp_path: Path, cell: str, expected: str) -> None:
    path = csv_with(tmp_path, "a.csv", f"{HEADER}\n1,0,1.5,2\n2,1,0.5,{cell}\n".encode())
    with pytest.raises(ConfigError) as info:
        load_party_csv(path, "id", "y")
    assert str(info.value) == f"VFL_DATA_CSV: {path}: {expected}"


FILE_CASES = [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "line 1: binary data (a NUL byte); expected a UTF-8 CSV text file"),
    (
        f"{HEADER}\n1,0,1,2\n2,1,caf\xe9,3\n".encode("latin-1"),
        "line 3, byte 8: not UTF-8 text (0xe9); expected a UTF-8 CSV",
    ),
    (f"{HEADER}\n".encode(), "a header and no data rows; expected at least one row"),
    (b"", "empty file; expected a header row"),
    (f"{HEADER}\n1,0,1,2\n2,1,3\n".encode(), "line 3: 3 fields, expected 4 as in the header"),
    (f"{HEADER}\n1,0,1,2\n1,1,3,4\n".encode(), "line 3, column 'id': the id of line 2 again; expected unique ids"),
    (
        f"{HEADER}\n1,0,1,2\n2,yes,3,4\n".encode(),
        "line 3, column 'y': expected a label (0 or 1, or a number within +-65536 for linear regression), got 'yes'",
    ),
    (b"id,y\n1,0\n", "line 1: no feature columns besides 'id'"),
]


@pytest.mark.parametrize(
    ("body", "expected"),
    FILE_CASES,
    ids=["binary", "latin-1", "header-only", "empty", "short-row", "duplicate-id", "bad-label", "no-features"],
)
def test_bad_file_named_with_what_was_expected(tmp_path: Path, body: bytes, expected: str) -> None:
    path = csv_with(tmp_path, "a.csv", body)
    with pytest.raises(ConfigError) as info:
        load_party_csv(path, "id", "y")
    assert str(info.value) == f"VFL_DATA_CSV: {path}: {expected}"


def test_a_utf8_bom_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = csv_with(tmp_path, "a.csv", f"\ufeff{HEADER}\n1,0,1,2\n".encode())
    assert load_party_csv(path, "id", "y").ids == ["1"]


# --- services at start-up: exit 2, exactly one line -----------------------------


def start_service(module: str, tmp_path: Path, **env: str) -> tuple[int, list[str]]:
    """Run a service until it exits (it must, within 60 s): its exit code and
    the stderr lines that are not log records."""
    full = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VFL_INSECURE": "true",
        "VFL_TEST_MODE": "true",
        "VFL_KEY_BITS": str(TEST_KEY_BITS),
        "VFL_HOST": "127.0.0.1",
        "VFL_PORT": "0",
        "VFL_DATA_DIR": str(tmp_path / "data"),
        "VFL_DATA_CSV": str(BUNDLED_PASSIVE),
        "VFL_LABEL_COLUMN": "y",
        "VFL_PEER_ADDRESS": "127.0.0.1:9",
        "VFL_UPSTREAM_ADDRESS": "127.0.0.1:9",
        "VFL_RELAY_TOKEN": "t" * 32,
        **env,
    }
    out = subprocess.run(
        [sys.executable, "-m", module], env=full, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    return out.returncode, [line for line in out.stderr.splitlines() if not line.startswith("ts=")]


def assert_one_line(result: tuple[int, list[str]], expected: str) -> None:
    code, lines = result
    assert (code, lines) == (2, [expected])


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\x7fELF\x02\x00binary", "line 1: binary data (a NUL byte); expected a UTF-8 CSV text file"),
        ("id,x0\n1,caf\xe9\n".encode("latin-1"), "line 2, byte 6: not UTF-8 text (0xe9); expected a UTF-8 CSV"),
        (
            b"id,x0,x1\n1,1,2\n2,0.5,nan\n",
            "line 3, column 'x1': expected a finite number, got 'nan', which is not finite",
        ),
    ],
    ids=["binary", "latin-1", "nan"],
)
def test_passive_service_refuses_a_bad_csv_in_one_line(tmp_path: Path, body: bytes, expected: str) -> None:
    path = csv_with(tmp_path, "b.csv", body)
    assert_one_line(
        start_service("vfl.services.passive", tmp_path, VFL_DATA_CSV=str(path)),
        f"config error: VFL_DATA_CSV: {path}: {expected}",
    )
    assert not (tmp_path / "data" / "keys").exists(), "a key was generated before the CSV was checked"


@pytest.mark.parametrize("module", ["vfl.services.active", "vfl.services.passive", "vfl.services.assistant"])
def test_taken_port_is_one_line_before_any_key_is_made(tmp_path: Path, module: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start_service(module, tmp_path, VFL_PORT=str(port), VFL_DATA_CSV=str(BUNDLED_ACTIVE))
    assert_one_line(result, f"config error: VFL_PORT: 127.0.0.1:{port} is already in use; expected a free port")
    assert not (tmp_path / "data").exists(), "the service wrote its data directory before finding the port taken"


def test_unknown_backend_names_vfl_backend(tmp_path: Path) -> None:
    assert_one_line(
        start_service("vfl.services.passive", tmp_path, VFL_BACKEND="rsa"),
        "config error: VFL_BACKEND: unknown crypto backend 'rsa', expected one of ['ou', 'paillier', 'phe']",
    )


def test_ray_address_with_nothing_there_is_one_line_in_seconds(tmp_path: Path) -> None:
    # ray.init alone would wait minutes for a GCS that is not there.
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    start = time.monotonic()
    result = start_service("vfl.services.passive", tmp_path, VFL_COMPUTE="ray", VFL_RAY_ADDRESS=f"127.0.0.1:{port}")
    assert_one_line(
        result,
        f"config error: VFL_RAY_ADDRESS: nothing answers at 127.0.0.1:{port} (Connection refused); "
        "expected the head of this party's Ray cluster (ray start --head)",
    )
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"VFL_RAY_WORKERS": "4"}, "config error: VFL_RAY_ADDRESS, VFL_RAY_WORKERS: only with VFL_COMPUTE=ray"),
        ({"VFL_COMPUTE": "spark"}, "config error: VFL_COMPUTE: Input should be 'local' or 'ray'"),
        ({"VFL_FEATURE_DTYPE": "int8"}, "config error: VFL_FEATURE_DTYPE: Input should be 'float64' or 'float32'"),
    ],
    ids=["ray-option-without-ray", "unknown-engine", "dtype"],
)
def test_compute_options_are_checked_in_one_line(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    assert_one_line(start_service("vfl.services.passive", tmp_path, **env), expected)


def test_unwritable_data_dir_names_vfl_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with read_only_dir(data) as why:
        assert_one_line(start_service("vfl.services.passive", tmp_path), f"config error: VFL_DATA_DIR: {data}: {why}")


def can_mount() -> str | None:
    """Why tmpfs mounts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (mounts a small tmpfs)"
    probe = Path(f"/tmp/vfl-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if out.returncode:
            return f"mount -t tmpfs refused: {out.stderr.decode(errors='replace').strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


MOUNT_SKIP = can_mount()


class read_only_dir:  # noqa: N801 - used as a context manager like a function
    """`path` as a directory this service's user cannot write: a read-only
    tmpfs as root (root ignores permission bits), mode 500 otherwise. Yields
    what the service should say about it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False

    def __enter__(self) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            if MOUNT_SKIP:
                pytest.skip(MOUNT_SKIP)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(self.path)], check=True)
            self.mounted = True
            return "read-only file system"
        self.path.chmod(0o500)
        return "permission denied; expected a directory this service's user can write"

    def __exit__(self, *exc: object) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=True)
        else:
            self.path.chmod(0o700)


# --- vfl demo ---------------------------------------------------------------------


def vfl(*args: str, cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vfl.cli.main", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_demo_takes_csv_paths_relative_to_the_callers_directory(tmp_path: Path) -> None:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_bytes(BUNDLED_ACTIVE.read_bytes())
    (tmp_path / "csv" / "b.csv").write_bytes(BUNDLED_PASSIVE.read_bytes())
    args = ["demo", "--active-csv", "csv/a.csv", "--passive-csv", "csv/b.csv", "--workdir", "run"]
    r = vfl(*args, "--key-bits", str(TEST_KEY_BITS), "--insecure", "--epochs", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    auc = float(r.stdout.strip().splitlines()[-1].removeprefix("AUC "))
    assert auc > 0.95
    assert (tmp_path / "run" / "active" / "data" / "models").is_dir(), "--workdir is relative to the caller too"


@pytest.mark.parametrize(
    ("option", "body", "expected"),
    [
        ("--active-csv", f"{HEADER}\n".encode(), "a header and no data rows; expected at least one row"),
        (
            "--passive-csv",
            "id,x0\n1,caf\xe9\n".encode("latin-1"),
            "line 2, byte 6: not UTF-8 text (0xe9); expected a UTF-8 CSV",
        ),
    ],
    ids=["active-header-only", "passive-latin-1"],
)
def test_demo_refuses_a_bad_csv_in_one_line(tmp_path: Path, option: str, body: bytes, expected: str) -> None:
    csv_with(tmp_path, "bad.csv", body)
    r = vfl("demo", option, "bad.csv", "--key-bits", str(TEST_KEY_BITS), "--insecure", cwd=tmp_path, timeout_s=60)
    assert (r.returncode, r.stderr.splitlines()) == (2, [f"error: {option}: bad.csv: {expected}"]), r.stdout


# --- a full disk --------------------------------------------------------------------


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte."""
    filler = directory / "filler.bin"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:
            while True:  # the last partial chunk
                fh.write(b"\0" * 512)
        except OSError:
            pass
    return filler


@dataclass
class TmpfsFederation:
    fed: LocalFederation
    data: dict[str, Path]
    client: VflClient
    ids: list[str]
    test_ids: list[str]
    kept: np.ndarray  # a stored model's scores of test_ids
    alignment_id: str  # the alignment the jobs train on

    def job_files(self, party: str) -> list[str]:
        jobs = self.data[party] / "jobs"
        return sorted(p.name for p in jobs.iterdir()) if jobs.exists() else []

    def assert_unharmed(self) -> None:
        assert_serving(self.fed, "active", "passive", "assistant")
        assert self.job_files("active") == [] and self.job_files("passive") == []
        np.testing.assert_allclose(self.client.predict("kept", self.test_ids), self.kept, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def tmpfs_federation(tmp_path_factory: pytest.TempPathFactory, breast: BreastSplit) -> Iterator[TmpfsFederation]:
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    workdir = tmp_path_factory.mktemp("diskfull")
    data = {party: workdir / party / "data" for party in ("active", "passive")}
    for path in data.values():
        path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=700", "tmpfs", str(path)], check=True)
    try:
        with make_federation(workdir) as fed, VflClient(fed.active_address, timeout_s=120) as client:
            client.wait_ready(30)
            ids = breast.train_ids[:192]
            aligned = client.align(ids)
            assert aligned.state == client_pb2.ALIGNMENT_STATE_SUCCEEDED, aligned.error
            config = job_config(epochs=4, batch_size=64)
            client.start_training(config, ids, job_id="kept", alignment_id=aligned.alignment_id)
            assert client.wait("kept").state == client_pb2.JOB_STATE_SUCCEEDED
            test_ids = breast.train_ids[:8]
            kept = client.predict("kept", test_ids)
            yield TmpfsFederation(fed, data, client, ids, test_ids, kept, aligned.alignment_id)
    finally:
        for path in data.values():
            subprocess.run(["umount", "-l", str(path)], check=False)


def no_space(party: str, path: Path) -> str:
    return f"{party} party: VFL_DATA_DIR: {path}: no space left on the device (disk full or quota reached)"


def train_again(t: TmpfsFederation, job_id: str) -> None:
    t.client.start_training(job_config(epochs=4, batch_size=64), t.ids, job_id=job_id, alignment_id=t.alignment_id)
    assert t.client.wait(job_id).state == client_pb2.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize("party", ["active", "passive"])
def test_disk_full_at_alignment(tmpfs_federation: TmpfsFederation, party: str) -> None:
    """The alignment fails with one line naming the party's directory; nothing
    stored is lost, and the next alignment (a fresh PSI) succeeds."""
    t = tmpfs_federation
    filler = fill(t.data[party])
    try:
        if party == "active":
            # A cannot note the alignment as running: StartAlignment is refused at once.
            expected = no_space(party, t.data[party] / "alignments-running")
            assert_refused(lambda: t.client.start_alignment(t.ids), Code.RESOURCE_EXHAUSTED, expected)
        else:
            done = t.client.align(t.ids)
            assert done.state == client_pb2.ALIGNMENT_STATE_FAILED
            expected = "passive party refused FinishAlignment: " + no_space(party, t.data[party] / "alignments")
            assert done.error == expected.replace("FinishAlignment: passive party: ", "FinishAlignment: ")
    finally:
        filler.unlink()
    t.assert_unharmed()
    again = t.client.align(t.ids)
    assert again.state == client_pb2.ALIGNMENT_STATE_SUCCEEDED and again.size == len(t.ids)


@pytest.mark.parametrize("party", ["active", "passive"])
def test_disk_full_at_start_training(tmpfs_federation: TmpfsFederation, party: str) -> None:
    t = tmpfs_federation
    job_id = f"full-at-start-{party}"
    filler = fill(t.data[party])
    try:
        expected = no_space(party, t.data[party] / "jobs")
        if party == "passive":
            expected = "passive party refused SetupJob: " + expected.removeprefix("passive party: ")
        assert_refused(
            lambda: t.client.start_training(
                job_config(epochs=4, batch_size=64), t.ids, job_id=job_id, alignment_id=t.alignment_id
            ),
            Code.RESOURCE_EXHAUSTED,
            expected,
        )
        assert_refused(lambda: t.client.status(job_id), Code.NOT_FOUND, job_id)
    finally:
        filler.unlink()
    t.assert_unharmed()
    train_again(t, job_id)  # the id was released


@pytest.mark.parametrize("party", ["active", "passive"])
def test_disk_full_mid_job(tmpfs_federation: TmpfsFederation, party: str) -> None:
    t = tmpfs_federation
    job_id = f"full-mid-job-{party}"
    t.client.start_training(job_config(epochs=40, batch_size=64), t.ids, job_id=job_id, alignment_id=t.alignment_id)
    deadline = time.monotonic() + 60
    while t.client.status(job_id).iteration < 3:
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.05)
    filler = fill(t.data[party])
    try:
        final = t.client.wait(job_id)
        assert final.state == client_pb2.JOB_STATE_FAILED
        assert "VFL_DATA_DIR: " + str(t.data[party]) in final.error, final.error
        assert "no space left on the device" in final.error, final.error
        assert final.error.startswith("active party: " if party == "active" else "passive party refused "), final.error
    finally:
        filler.unlink()
    deadline = time.monotonic() + 10
    while (t.job_files("active") or t.job_files("passive")) and time.monotonic() < deadline:
        time.sleep(0.1)  # A's abort reaches B just after the job's state changes
    t.assert_unharmed()
    assert not t.fed.services["active"].proc.poll()
    train_again(t, job_id + "-again")
