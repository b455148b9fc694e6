"""A curious reader of the Prometheus endpoints (anyone on the monitoring
network: the endpoint has no TLS) scrapes A, B and C during a job and after
predictions, over real gRPC with each party its own process, and looks for
the data: any id of either party's file in a label or anywhere in the text,
and either party's model weights among the sample values. It finds none.
Against the planted twin (a per-request metric labelled by the ids a request
names) it reads the predicted ids off A's endpoint."""

from __future__ import annotations

import csv
import re
import urllib.request
from pathlib import Path

import numpy as np

from tests.conftest import make_federation, read_shard
from tests.test_prometheus import free_port
from vfl.cli.client import VflClient
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE, split_ids
from vfl.common.jobconfig import JobConfig
from vfl.v1 import client_pb2

NAMES = ("active", "passive", "assistant")


def _text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:  # noqa: S310
        return str(reply.read().decode())


def _ids() -> set[str]:
    ids: set[str] = set()
    for path in (BUNDLED_ACTIVE, BUNDLED_PASSIVE):
        with path.open(newline="") as fh:
            ids.update(row["id"] for row in csv.DictReader(fh))
    return ids


def _scrape_a_run(tmp_path: Path, plants: dict[str, str]) -> tuple[dict[str, str], dict[str, np.ndarray], list[str]]:
    """Every endpoint's text during and after a job and a prediction, the
    parties' weights, and the ids predicted."""
    ports = {name: free_port() for name in NAMES}
    train, test, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    texts = {name: "" for name in NAMES}

    def scrape_all() -> None:
        for name, port in ports.items():
            texts[name] += _text(port)

    env = {name: {"VFL_METRICS_PORT": str(port)} for name, port in ports.items()}
    seen: list[int] = []
    with (
        make_federation(tmp_path, service_env=env, plants=plants) as fed,
        VflClient(fed.active_address, timeout_s=120) as c,
    ):
        c.wait_ready(30)

        def during(ev: client_pb2.JobEvent) -> None:
            if ev.iteration >= 3 and not seen:
                seen.append(ev.iteration)
                scrape_all()

        final = c.wait(c.start_training(JobConfig(epochs=2, batch_size=64, seed=8), train, "m", test).job_id, during)
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED and seen
        c.predict("m", test[:40])
        scrape_all()
        weights = {p: np.asarray(read_shard(fed, p, "m")["weights"]) for p in ("active", "passive")}
    return texts, weights, test[:40]


def _labels(text: str) -> set[str]:
    return set(re.findall(r'="([^"]*)"', text))


def _values(text: str) -> np.ndarray:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            try:
                out.append(float(line.rsplit(" ", 1)[1]))
            except ValueError:
                pass
    return np.asarray(out)


def test_a_scraper_reads_no_id_and_no_weight(tmp_path: Path) -> None:
    texts, weights, _ = _scrape_a_run(tmp_path, {})
    ids = _ids()
    for name, text in texts.items():
        assert "vfl_" in text, f"{name} served no metrics: the check would look at nothing"
        leaked = _labels(text) & ids
        assert not leaked, f"ids of the data in {name}'s metric labels: {sorted(leaked)[:5]}"
        values = _values(text)
        for party, w in weights.items():
            hits = [v for v in w if abs(v) > 1e-6 and np.isclose(values, v, rtol=1e-9, atol=0).any()]
            assert not hits, f"{party}'s weights among {name}'s metric values: {hits[:3]}"


def test_the_planted_id_label_is_read_off(tmp_path: Path) -> None:
    texts, _, predicted = _scrape_a_run(tmp_path, {"active": "metrics-ids-label"})
    leaked = _labels(texts["active"]) & _ids()
    assert set(predicted) <= leaked, "the planted twin leaks every predicted id: the check can see it"
