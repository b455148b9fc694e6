"""Mutual TLS on every connection: a whole job through the assistant's
CONNECT tunnel under mTLS (end to end A-B: C holds no certificate), clients
without a certificate or with another CA's refused, each service authorising
calls by the caller's identity, and the start-up rules (no TLS files and no
VFL_INSECURE: exit 2; VFL_INSECURE: a loud warning). What C can and cannot do
is tests/attacks/test_assistant.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from tests.conftest import BreastSplit, make_federation, tls_client
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation, start_service
from vfl.cli.main import app
from vfl.common import healthcheck
from vfl.common.jobconfig import JobConfig
from vfl.common.rpc import open_channel
from vfl.common.tls import TlsConfig, TlsFiles, create_certs
from vfl.v1 import client_pb2, party_pb2, party_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PASSIVE_CSV = str(ROOT / "data" / "breast_hetero_host.csv")
CONFIG = JobConfig(epochs=1, batch_size=64, learning_rate=0.15, l2=0.01, seed=7)


@pytest.fixture(scope="module")
def tls_fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """B, C and A with 1024-bit keys (test mode), every connection mutual TLS."""
    with make_federation(tmp_path_factory.mktemp("tlsfed"), tls=True, assistant=True) as fed:
        yield fed


@pytest.fixture(scope="module")
def trained(tls_fed: LocalFederation, breast: BreastSplit) -> str:
    """One epoch through the assistant, under mTLS; returns the model id."""
    with tls_client(tls_fed) as c:
        c.wait_ready(30)
        c.start_training(CONFIG, breast.train_ids, "tls-job")
        final = c.wait("tls-job")
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
    return final.job_id


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def party_stub(
    fed: LocalFederation, service: str, identity: str
) -> tuple[grpc.Channel, party_pb2_grpc.PartyServiceStub]:
    files = fed.tls_files(identity)
    assert files is not None
    channel = open_channel(fed.services[service].address, TlsConfig.load(files), server_name=service)
    return channel, party_pb2_grpc.PartyServiceStub(channel)


def test_training_and_prediction_through_the_assistant_under_mtls(tls_fed, trained, breast):
    with tls_client(tls_fed) as c:
        probs = c.predict(trained, breast.test_ids)
        assert trained in {m.model_id for m in c.list_models()}
    auc = roc_auc_score([breast.labels[i] for i in breast.test_ids], probs)
    assert auc > 0.95
    # Both parties ran with TLS and no warning about plaintext; C only tunnels.
    for name in ("active", "passive"):
        log = tls_fed.services[name].log_path.read_text()
        assert f"event=tls identity={name} client_auth=required" in log, name
        assert "insecure_transport" not in log, name
    log = tls_fed.services["assistant"].log_path.read_text()
    assert "mode=connect-tunnel" in log and "relay_token=required" in log
    assert "event=tunnel_open" in log and "event=tls" not in log


def test_plaintext_client_is_refused(tls_fed):
    for name in ("active", "passive"):
        with grpc.insecure_channel(tls_fed.services[name].address) as ch:
            err = refused(
                lambda ch=ch: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            )
        assert err.code() == grpc.StatusCode.UNAVAILABLE, name
    with VflClient(tls_fed.active_address, timeout_s=5) as c:
        assert refused(c.list_models).code() == grpc.StatusCode.UNAVAILABLE


def test_client_with_a_certificate_from_another_ca_is_refused(tls_fed, tmp_path):
    create_certs(tmp_path / "other")
    with VflClient(tls_fed.active_address, 5, tls=TlsFiles.in_dir(tmp_path / "other", "client")) as c:
        assert refused(c.list_models).code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA does not accept the federation's servers either.
    ours = TlsFiles.in_dir(tls_fed.certs_dir, "client")
    mixed = TlsFiles(tmp_path / "other" / "ca.pem", ours.cert, ours.key)
    with pytest.raises(ValueError, match="not issued by the CA"):
        TlsConfig.load(mixed)


def test_service_certificate_cannot_call_the_training_service(tls_fed):
    with tls_client(tls_fed, "passive", timeout_s=10) as c:
        err = refused(lambda: c.start_training(CONFIG, [], "not-allowed", alignment_id="any"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == "identity 'passive' may not call /vfl.v1.TrainingService/StartTraining"
        assert refused(c.list_models).code() == grpc.StatusCode.PERMISSION_DENIED
        assert refused(lambda: list(c.watch("tls-job"))).code() == grpc.StatusCode.PERMISSION_DENIED
    # Another client name is refused too unless listed in VFL_ALLOWED_CLIENTS.
    with tls_client(tls_fed, "alice", timeout_s=10) as c:
        err = refused(c.list_models)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'alice'" in err.details()
    log = tls_fed.services["active"].log_path.read_text()
    assert "event=rpc_denied method=/vfl.v1.TrainingService/StartTraining identity=passive" in log
    with tls_client(tls_fed, timeout_s=10) as c:
        assert "not-allowed" not in {m.model_id for m in c.list_models()}


def test_client_certificate_cannot_call_party_service(tls_fed):
    # The assistant's certificate is refused like any other: see tests/attacks/test_assistant.py.
    for service, identity in [("passive", "client"), ("passive", "assistant")]:
        channel, stub = party_stub(tls_fed, service, identity)
        with channel:
            err = refused(lambda stub=stub: stub.ExchangeKeys(party_pb2.KeyExchangeRequest(), timeout=10))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (service, identity)
            assert err.details() == f"identity {identity!r} may not call /vfl.v1.PartyService/ExchangeKeys"
            # Streaming methods are refused before the handler reads the stream.
            err = refused(lambda stub=stub: list(stub.ExchangeResidualShares(iter([]), timeout=10)))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "ExchangeResidualShares" in err.details()
            err = refused(lambda stub=stub: stub.SetupJob(iter([]), timeout=10))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "SetupJob" in err.details()
            # Health and reflection: any authenticated identity.
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert "vfl.v1.PartyService" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_server_must_present_the_expected_identity(tls_fed):
    """Channels name the certificate they expect (A's channel to B names
    "passive", through the assistant too): the active party's certificate is
    not accepted where the passive party's is expected."""
    files = tls_fed.tls_files("client")
    assert files is not None
    with VflClient(tls_fed.active_address, 5, tls=files, server_name="passive") as c:
        assert refused(c.list_models).code() == grpc.StatusCode.UNAVAILABLE


def test_healthcheck_with_tls(tls_fed, capsys):
    address = tls_fed.services["passive"].address
    assert healthcheck.main([address, "--tls-dir", str(tls_fed.certs_dir), "--tls-name", "passive"]) == 0
    assert capsys.readouterr().out.strip() == f"{address} SERVING"
    assert healthcheck.main([address, "--timeout", "2"]) == 1


def run_service(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VFL_")}
    full.update(PYTHONPATH=str(ROOT), VFL_DATA_CSV=PASSIVE_CSV, VFL_DATA_DIR=str(cwd / "d"), **env)
    return subprocess.run(
        [sys.executable, "-m", "vfl.services.passive"], env=full, capture_output=True, text=True, timeout=60, cwd=cwd
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "config error: VFL_TLS_DIR: not set: give the TLS files"),
        ({"VFL_INSECURE": "false"}, "VFL_INSECURE=true"),
        ({"VFL_TLS_DIR": "/nonexistent"}, "config error: VFL_TLS_DIR: /nonexistent/ca.pem: no such file"),
        ({"VFL_TLS_CA": "/x/ca.pem"}, "config error: VFL_TLS_CERT: not set"),
        ({"VFL_TLS_DIR": "CERTS", "VFL_INSECURE": "true"}, "config error: VFL_INSECURE: true together with"),
        (
            {"VFL_TLS_DIR": "CERTS", "VFL_TLS_KEY": "CERTS/client.key"},
            "config error: VFL_TLS_KEY: CERTS/client.key: does not match the certificate CERTS/passive.pem",
        ),
        (
            {"VFL_TLS_CA": "CERTS/ca.pem", "VFL_TLS_CERT": "CERTS/ca.key", "VFL_TLS_KEY": "CERTS/passive.key"},
            "config error: VFL_TLS_CERT: CERTS/ca.key: not a PEM certificate",
        ),
    ],
)
def test_service_without_usable_tls_or_insecure_exits_2(tmp_path, env, expected):
    create_certs(tmp_path / "certs")
    env = {k: v.replace("CERTS", str(tmp_path / "certs")) for k, v in env.items()}
    expected = expected.replace("CERTS", str(tmp_path / "certs"))
    result = run_service(env, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error")]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_insecure_service_logs_a_warning_and_serves_plaintext(tmp_path):
    env = {"VFL_DATA_CSV": PASSIVE_CSV, "VFL_DATA_DIR": str(tmp_path / "d"), "VFL_KEY_BITS": "1024"}
    env.update(VFL_TEST_MODE="true", VFL_INSECURE="true")
    svc = start_service("passive", "vfl.services.passive", env, tmp_path)
    try:
        ok, line = healthcheck.check(svc.address, 5)
        assert ok, line
    finally:
        svc.stop()
    warnings = [line for line in svc.log_path.read_text().splitlines() if "level=WARNING" in line]
    assert any("VFL_INSECURE=true" in line and "PLAINTEXT" in line for line in warnings), warnings


def test_vfl_certs_command(tmp_path):
    out = tmp_path / "certs"
    result = CliRunner().invoke(app, ["certs", "--out", str(out), "--names", "alice,bob", "--names", "carol"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("active", "passive", "assistant", "client", "alice", "bob", "carol"):
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600
        assert TlsConfig.load(TlsFiles.in_dir(out, name)).identity == name
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    before = (out / "active.pem").read_bytes()
    result = CliRunner().invoke(app, ["certs", "--out", str(out), "--names", "dave"])
    assert result.exit_code == 0 and "created dave" in result.output, result.output
    assert (out / "active.pem").read_bytes() == before  # kept, same CA
    assert CliRunner().invoke(app, ["certs", "--out", str(out), "--names", "Not OK"]).exit_code == 2


def test_cli_needs_tls_dir_or_insecure(tls_fed):
    result = CliRunner().invoke(
        app, ["models", "--address", tls_fed.active_address], env={"VFL_TLS_DIR": None, "VFL_INSECURE": None}
    )
    assert result.exit_code == 2 and "--tls-dir" in result.output
