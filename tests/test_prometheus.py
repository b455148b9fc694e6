"""Prometheus metrics (docs/METRICS.md) over real gRPC, each party in its own
process: scraped from A, B and C while a job runs and after it, the names
and values documented, no id of the data in any label, and a bad
VFL_METRICS_PORT refused at start-up in one line."""

from __future__ import annotations

import csv
import socket
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.attacks.harness import MaliciousActive, attack_federation, refused
from tests.conftest import BreastSplit, make_federation, tls_client
from tests.test_bad_input import assert_one_line, start_service
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE, split_ids
from vfl.common.crypto.backend import get_backend
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol import steps
from vfl.common.rpc import status_of
from vfl.v1 import client_pb2

STEP_1_2 = ("ExchangeResidualShares", "ExchangeResidualSharesUnary")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "METRICS.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:  # noqa: S310
        text = reply.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def names(samples: Iterable[Sample]) -> set[str]:
    return {s.name for s in samples}


def data_ids() -> set[str]:
    ids: set[str] = set()
    for path in (BUNDLED_ACTIVE, BUNDLED_PASSIVE):
        with path.open(newline="") as fh:
            ids.update(row["id"] for row in csv.DictReader(fh))
    return ids


def test_each_service_serves_the_documented_metrics(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("active", "passive", "assistant")}
    train, _, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    config = JobConfig(epochs=4, batch_size=64, seed=3)
    during: dict[str, list[Sample]] = {}

    def on_event(ev: client_pb2.JobEvent) -> None:
        if not during and ev.state == client_pb2.JOB_STATE_RUNNING and ev.iteration >= 3:
            during.update(active=scrape(ports["active"]), passive=scrape(ports["passive"]))

    env = {name: {"VFL_METRICS_PORT": str(port)} for name, port in ports.items()}
    env["passive"]["VFL_MAX_PREDICT_IDS_PER_MODEL"] = "30"
    with make_federation(tmp_path, tls=True, assistant=True, service_env=env) as fed, tls_client(fed) as c:
        c.wait_ready(30)
        job = c.start_training(config, train, "metrics-job")
        final = c.wait(job.job_id, on_event)
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
        assert during, "the job ended before iteration 3 was seen"

        # While the job ran.
        a, b = during["active"], during["passive"]
        assert value(a, "vfl_jobs", state="running") == 1
        assert value(a, "vfl_jobs", state="succeeded") == 0
        assert value(a, "vfl_iterations_total") >= 3
        assert value(b, "vfl_iterations_total") >= 2
        assert value(b, "vfl_jobs", state="running") == 1
        # Steps 1-2: the streaming method, or its unary twin for messages under one chunk (these batches).
        shares = [value(b, "vfl_rpc_duration_seconds_count", method=m, code="OK") for m in STEP_1_2]
        assert sum(shares) >= 3, shares
        assert value(a, "vfl_rpc_duration_seconds_count", method="WatchJob") == 0, "a stream counts when it ends"
        assert value(b, "vfl_decryptions_total", result="served") >= 3
        assert value(b, "vfl_decryptions_total", result="refused") == 0
        assert value(a, "vfl_decryptions_total", result="served") >= 3
        for s in (a, b):
            assert value(s, "vfl_bytes_sent_total") > 0
            assert max(x.value for x in s if x.name == "vfl_phase_seconds_total") > 0
        assert value(b, "vfl_phase_seconds_total", phase="decrypt") > 0
        assert value(a, "vfl_phase_seconds_total", phase="rpc_wait") > 0

        # After it: a prediction charged at B, a refused one, a NOT_FOUND at A.
        after = scrape(ports["active"])
        assert value(after, "vfl_jobs", state="running") == 0
        assert value(after, "vfl_jobs", state="succeeded") == 1
        assert value(after, "vfl_iterations_total") == final.total_iterations
        before = scrape(ports["passive"])
        assert value(before, "vfl_iterations_total") == final.total_iterations
        assert value(before, "vfl_jobs", state="running") == 0
        assert value(before, "vfl_prediction_ids_total") == 0
        scores = c.predict(job.job_id, train[:25])
        assert len(scores) == 25
        with pytest.raises(grpc.RpcError) as refused:
            c.predict(job.job_id, train[25:35])  # 10 more: over the model's 30
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as missing:
            c.status("no-such-job")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        b = scrape(ports["passive"])
        assert value(b, "vfl_prediction_ids_total", peer="active", model=job.job_id) == 25
        assert value(b, "vfl_prediction_ids_refused_total", peer="active") == 10
        assert value(b, "vfl_prediction_ids_left", peer="active", budget="model", model=job.job_id) == 5
        assert value(b, "vfl_prediction_ids_left", peer="active", budget="window") == 1_000_000 - 25
        assert value(b, "vfl_rpc_duration_seconds_count", method="PredictScores") == 2
        assert value(b, "vfl_rpc_errors_total", method="PredictScores", code="RESOURCE_EXHAUSTED") == 1
        a = scrape(ports["active"])
        assert value(a, "vfl_rpc_errors_total", method="GetJobStatus", code="NOT_FOUND") == 1
        assert value(a, "vfl_rpc_duration_seconds_count", method="GetJobStatus", code="NOT_FOUND") == 1
        assert value(a, "vfl_rpc_errors_total", method="Predict", code="RESOURCE_EXHAUSTED") == 1
        assert value(a, "vfl_rpc_duration_seconds_count", method="Predict", code="OK") == 1
        assert value(a, "vfl_rpc_duration_seconds_count", method="WatchJob", code="OK") == 1
        assert value(a, "vfl_rpc_errors_total", code="OK") == 0
        assert value(a, "vfl_build_info", service="active") == 1

        # C relays bytes it cannot read: tunnels and bytes, no RPC metrics.
        assistant = scrape(ports["assistant"])
        assert value(assistant, "vfl_tunnels_opened_total") >= 1
        assert value(assistant, "vfl_tunnels_open") >= 1
        assert not any(n.startswith("vfl_rpc_") for n in names(assistant))
        assert value(assistant, "vfl_build_info", service="assistant") == 1

    # Every name a service serves is documented, and none of the data's ids is a label value.
    documented = DOCS.read_text()
    served = names(a) | names(b) | names(assistant)
    families = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in served}
    undocumented = sorted(n for n in families if n.startswith("vfl_") and f"`{n}" not in documented)
    assert not undocumented, f"served but not in docs/METRICS.md: {undocumented}"
    ids = data_ids()
    scraped = [*during["active"], *during["passive"], *a, *b, *assistant]
    leaked = {(s.name, k, v) for s in scraped for k, v in s.labels.items() if v in ids}
    assert not leaked, f"an id of the data in a metric label: {sorted(leaked)[:5]}"


@pytest.mark.parametrize("module", ["vfl.services.active", "vfl.services.passive", "vfl.services.assistant"])
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"VFL_METRICS_PORT": "abc"},
            "VFL_METRICS_PORT: Input should be a valid integer, unable to parse string as an integer",
        ),
        ({"VFL_METRICS_PORT": "70000"}, "VFL_METRICS_PORT: Input should be less than or equal to 65535"),
        (
            {"VFL_METRICS_PORT": "50999", "VFL_PORT": "50999"},
            "VFL_METRICS_PORT: 50999 is also VFL_PORT; expected another port",
        ),
        (
            {"VFL_METRICS_PORT": "50998", "VFL_METRICS_HOST": "no-such-host.invalid"},
            "VFL_METRICS_HOST: no-such-host.invalid: cannot be resolved to an address",
        ),
        (
            {"VFL_METRICS_PORT": "50997", "VFL_METRICS_HOST": "192.0.2.1"},  # TEST-NET-1: never this machine's
            "VFL_METRICS_HOST: 192.0.2.1 is not an address of this machine",
        ),
    ],
    ids=["not-a-number", "out-of-range", "the-service-port", "unknown-host", "not-this-machine"],
)
def test_a_bad_metrics_setting_is_one_line(tmp_path: Path, module: str, env: dict[str, str], expected: str) -> None:
    assert_one_line(start_service(module, tmp_path, **env), f"config error: {expected}")


@pytest.mark.parametrize("module", ["vfl.services.active", "vfl.services.passive", "vfl.services.assistant"])
def test_a_taken_metrics_port_is_one_line_before_any_key_is_made(tmp_path: Path, module: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start_service(module, tmp_path, VFL_METRICS_PORT=str(port), VFL_DATA_CSV=str(BUNDLED_ACTIVE))
    assert_one_line(
        result, f"config error: VFL_METRICS_PORT: could not serve metrics on 127.0.0.1:{port}: Address already in use"
    )
    assert not (tmp_path / "data" / "keys").exists(), "a key was made before the metrics port was found taken"


def test_b_counts_the_decryptions_it_serves_and_refuses(tmp_path: Path, breast: BreastSplit) -> None:
    """Over real gRPC, A played by the test (tests/attacks/harness.py): step 4
    served once, the same request again answered from memory (no second
    decryption), a different one in the same iteration refused."""
    port = free_port()
    backend = get_backend("ou")
    fed = attack_federation(tmp_path, None, VFL_METRICS_PORT=str(port))
    try:
        fed.start("passive")
        a = MaliciousActive(fed.services["passive"].address, backend.generate_keypair(1024), backend, breast.train_ids)
        try:
            a.exchange_keys()
            a.setup(JobConfig(batch_size=64, epochs=2, seed=5, loss_every=0, max_iterations=12))
            b_enc = a.shares(0)
            grad = steps.masked_encrypted_gradient(backend, a.view.x[a.rows(0)], b_enc)
            a.gradients(0, None, crafted=grad.ciphers)
            a.gradients(0, None, crafted=grad.ciphers)  # a retry: the same answer, not a new decryption
            assert value(scrape(port), "vfl_decryptions_total", result="served") == 1
            assert value(scrape(port), "vfl_decryptions_total", result="refused") == 0
            err = refused(a.gradients, 0, b_enc)  # a fresh mask: another vector to decrypt in iteration 0
            assert status_of(err) == grpc.StatusCode.FAILED_PRECONDITION, err
        finally:
            a.close()
        samples = scrape(port)
        assert value(samples, "vfl_decryptions_total", result="served") == 1
        assert value(samples, "vfl_decryptions_total", result="refused") == 1
        assert value(samples, "vfl_jobs", state="running") == 0, "the refusal ended the job"
        assert value(samples, "vfl_rpc_errors_total", code="FAILED_PRECONDITION") == 1
    finally:
        fed.stop()
