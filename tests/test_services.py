"""Service behaviour a user relies on: health and reflection for other
systems' clients, start-up validation, keys kept owner-only and reused, and
the CLI against any pair of CSVs."""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.conftest import TEST_KEY_BITS, read_private_key
from vfl.cli.federation import LocalFederation, start_service
from vfl.common import healthcheck

ROOT = Path(__file__).resolve().parent.parent


def test_every_service_reports_health_and_serves_reflection(federation):
    expected = {
        "active": "vfl.v1.TrainingService",
        "passive": "vfl.v1.PartyService",
    }
    for name, service in expected.items():
        with grpc.insecure_channel(federation.services[name].address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for svc in ("", service):
                reply = health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, svc)
            db = ProtoReflectionDescriptorDatabase(ch)
            assert service in db.get_services(), name
            # A client with no generated code can find every RPC and message.
            methods = {m.name for m in db.FindFileContainingSymbol(service).service[0].method}
            assert "Predict" in methods or "ExchangeMaskedGradients" in methods


def test_assistant_answers_healthz_and_serves_no_grpc(federation):
    """C is a CONNECT proxy: GET /healthz is its health check; a gRPC client
    that talks to it directly gets no service (HTTP/2's preface is refused)."""
    address = federation.services["assistant"].address
    assert healthcheck.check_http(address, 5) == (True, f"{address} SERVING")
    assert healthcheck.main(["--http", address]) == 0
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "event=tunnel_refused" in federation.services["assistant"].log_path.read_text()


@pytest.mark.parametrize(
    ("module", "env", "expected"),
    [
        ("vfl.services.assistant", {}, "config error: VFL_RELAY_TOKEN: not set"),
        ("vfl.services.assistant", {"VFL_RELAY_TOKEN": "short"}, "config error: VFL_RELAY_TOKEN: expected 16 to 512"),
        ("vfl.services.assistant", {"VFL_RELAY_TOKEN_FILE": "/nonexistent"}, "VFL_RELAY_TOKEN_FILE: /nonexistent"),
        ("vfl.services.assistant", {"VFL_UPSTREAM_ADDRESS": "passive"}, "config error: VFL_UPSTREAM_ADDRESS:"),
        ("vfl.services.active", {"VFL_ASSISTANT_ADDRESS": "127.0.0.1:1"}, "config error: VFL_RELAY_TOKEN: not set"),
    ],
)
def test_relay_token_is_required_with_the_assistant(tmp_path, module, env, expected):
    base = {
        "VFL_DATA_CSV": str(ROOT / "data" / "breast_hetero_guest.csv"),
        "VFL_DATA_DIR": str(tmp_path / "d"),
        "VFL_INSECURE": "true",
        "VFL_PEER_ADDRESS": "127.0.0.1:2",
        "VFL_UPSTREAM_ADDRESS": "127.0.0.1:2",
        "VFL_RELAY_TOKEN": "",
        "VFL_RELAY_TOKEN_FILE": "",
        "VFL_ASSISTANT_ADDRESS": "",
    }
    result = run_service(module, {**base, **env}, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error")]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_keys_are_owner_only_and_reused_after_restart(federation):
    for party in ("active", "passive"):
        key_file = federation.workdir / party / "data" / "keys" / "private_key.json"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
        assert read_private_key(federation, party).public.bits == TEST_KEY_BITS
    before = read_private_key(federation, "passive").public.fingerprint
    federation.services["passive"].stop()
    federation.start("passive")
    assert read_private_key(federation, "passive").public.fingerprint == before


def run_service(module: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", module], env=full, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"VFL_PORT": "99999"}, "config error: VFL_PORT:"),
        ({"VFL_KEY_BITS": "1024"}, "VFL_KEY_BITS: expected at least 2048"),
        ({"VFL_DATA_CSV": "/nonexistent.csv"}, "VFL_DATA_CSV: /nonexistent.csv: no such file"),
        ({"VFL_LOG_LEVEL": "LOUD"}, "config error: VFL_LOG_LEVEL:"),
    ],
)
def test_bad_configuration_stops_with_one_clear_line(tmp_path, env, expected):
    base = {
        "VFL_DATA_CSV": str(ROOT / "data" / "breast_hetero_host.csv"),
        "VFL_DATA_DIR": str(tmp_path / "d"),
        "VFL_INSECURE": "true",
    }
    result = run_service("vfl.services.passive", {**base, **env}, tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error")]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_active_party_requires_its_peer_address(tmp_path):
    env = {"VFL_DATA_CSV": str(ROOT / "data" / "breast_hetero_guest.csv"), "VFL_DATA_DIR": str(tmp_path / "d")}
    result = run_service("vfl.services.active", env, tmp_path)
    assert result.returncode == 2
    assert "VFL_PEER_ADDRESS" in result.stderr


def test_private_key_with_open_permissions_is_refused(tmp_path):
    env = {
        "VFL_DATA_CSV": str(ROOT / "data" / "breast_hetero_host.csv"),
        "VFL_DATA_DIR": str(tmp_path / "d"),
        "VFL_KEY_BITS": "1024",
        "VFL_TEST_MODE": "true",
        "VFL_INSECURE": "true",
    }
    svc = start_service("passive", "vfl.services.passive", env, tmp_path)
    svc.stop()
    key_file = tmp_path / "d" / "keys" / "private_key.json"
    key_file.chmod(0o644)
    result = run_service("vfl.services.passive", env, tmp_path)
    assert result.returncode == 2 and "owner-only" in result.stderr


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_cli_trains_any_pair_of_csvs(tmp_path):
    """Other column names, another label name, 3 + 5 features, ids in a
    different order at each party: `vfl demo` joins on the id and learns."""
    rng = np.random.default_rng(5)
    n = 400
    units = np.array([1, 10, 100, 1, 1, 5, 1, 1])  # unstandardised columns
    x = rng.normal(size=(n, 8)) * units
    y = ((x / units) @ rng.normal(size=8) + 0.2 * rng.normal(size=n) > 0).astype(int)
    ids = [f"c{i:05d}" for i in range(n)]
    a_rows = [[ids[i], int(y[i]), *np.round(x[i, :3], 5)] for i in range(n)]
    b_order = rng.permutation(n)
    b_rows = [[ids[i], *np.round(x[i, 3:], 5)] for i in b_order]
    active = write_csv(tmp_path / "bank.csv", ["customer", "defaulted", "f1", "f2", "f3"], a_rows)
    passive = write_csv(tmp_path / "insurer.csv", ["customer", "g1", "g2", "g3", "g4", "g5"], b_rows)
    cmd = [sys.executable, "-m", "vfl.cli.main", "demo", "--active-csv", str(active), "--passive-csv", str(passive)]
    cmd += ["--label-column", "defaulted", "--id-column", "customer", "--key-bits", "1024", "--batch-size", "20"]
    cmd += ["--epochs", "3", "--no-assistant", "--workdir", str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("AUC ")
    assert float(last.split()[1]) > 0.9


def test_cli_train_status_predict_models_against_running_services(tmp_path, breast):
    with LocalFederation(
        tmp_path, ROOT / "data" / "breast_hetero_guest.csv", ROOT / "data" / "breast_hetero_host.csv", key_bits=1024
    ) as fed:
        ids_csv = write_csv(tmp_path / "train.csv", ["id"], [[i] for i in breast.train_ids])
        test_csv = write_csv(tmp_path / "test.csv", ["id"], [[i] for i in breast.test_ids[:15]])
        base = [sys.executable, "-m", "vfl.cli.main"]
        addr = ["--address", fed.active_address, "--tls-dir", str(fed.certs_dir)]

        def vfl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*base, *args, *addr], capture_output=True, text=True, timeout=300, cwd=ROOT)

        # Align by PSI first; the intersection is the whole bundled split.
        r = vfl("align", "--alignment-id", "cli-align", "--out", str(tmp_path / "aligned.txt"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "aligned cli-align: 569 ids in the intersection (active 569, passive 569)" in " ".join(r.stdout.split())
        assert sorted((tmp_path / "aligned.txt").read_text().split()) == sorted(breast.labels)
        r = vfl("alignments")
        assert "cli-align" in r.stdout and "succeeded" in r.stdout

        # B's defaults: at least 10 iterations, and it scores only the model's training and holdout ids.
        r = vfl(
            "train",
            "--epochs",
            "2",
            "--job-id",
            "cli-job",
            "--ids-csv",
            str(ids_csv),
            "--holdout-ids-csv",
            str(test_csv),
            "--alignment-id",
            "cli-align",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "model cli-job" in r.stdout
        r = vfl("status", "cli-job")
        assert "succeeded" in r.stdout and "iteration 14/14" in r.stdout
        r = vfl("predict", "cli-job", "--ids-csv", str(test_csv), "--out", str(tmp_path / "p.csv"))
        assert r.returncode == 0, r.stderr
        lines = (tmp_path / "p.csv").read_text().splitlines()
        assert lines[0] == "id,probability,status" and len(lines) == 16
        assert all(0.0 <= float(line.split(",")[1]) <= 1.0 for line in lines[1:])
        assert all(line.endswith(",scored") for line in lines[1:])
        # An id outside the model's population is marked, not an error (B's default scope).
        outside = write_csv(tmp_path / "outside.csv", ["id"], [[breast.test_ids[20]]])
        r = vfl("predict", "cli-job", "--ids-csv", str(outside))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == f"{breast.test_ids[20]},,not_at_passive"
        r = vfl("models")
        assert "cli-job" in r.stdout
        r = vfl("status", "no-such-job")
        assert r.returncode == 1 and "NOT_FOUND" in r.stderr
