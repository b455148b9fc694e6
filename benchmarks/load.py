"""Prediction under load: many clients calling Predict at once.

A local federation (B, C and A as three processes, gRPC through the
assistant on loopback, plaintext as the other workloads) trains the breast
model on the `vfl demo` split; then `clients` threads, each with its own
VflClient (its own channel), call Predict back to back for `duration_s`
seconds, each call on `ids_per_call` ids drawn at random from the held-out
ids. Every reply is checked against a reference prediction of the same ids
made before the load (decryption is exact, so any difference is an error,
as is any failed call).

Recorded: calls and errors, predictions/s and calls/s over the load window,
latency percentiles of the calls (as the clients see them: queueing at A
included), the services' peak memory.

`python -m benchmarks.load [--quick]` runs it alone and prints the record;
`make bench BENCH=load` runs it through the harness (results.json,
BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.machine import descendants, peak_rss_bytes
from vfl.cli.client import STATE_NAMES, VflClient
from vfl.cli.federation import LocalFederation
from vfl.cli.main import bundled_data_dir, split_ids
from vfl.common.crypto.backend import DEFAULT_BACKEND
from vfl.common.jobconfig import job_config
from vfl.v1 import client_pb2

FULL = {"clients": 32, "duration_s": 30.0}
QUICK = {"clients": 4, "duration_s": 5.0}
IDS_PER_CALL = 16
EPOCHS = 3
CONFIG: dict[str, Any] = {"batch_size": 64, "learning_rate": 0.15, "l2": 0.01, "seed": 42, "loss_every": 1}
MODEL_ID = "load-model"
MAX_ERROR_SAMPLES = 5


class LoadFailed(RuntimeError):
    """The federation could not be set up for the load (no model to query)."""


@dataclass
class ClientStats:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    last_done: float = 0.0


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(np.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def _client_loop(
    address: str,
    test_ids: list[str],
    reference: dict[str, float],
    ids_per_call: int,
    seed: int,
    start: threading.Barrier,
    deadline: list[float],
    stats: ClientStats,
) -> None:
    rng = random.Random(seed)
    with VflClient(address, timeout_s=60) as client:
        try:
            client.wait_ready(30)
        except Exception:
            start.abort()  # the load cannot start with a client short
            raise
        start.wait(120)
        while time.perf_counter() < deadline[0]:
            ids = rng.sample(test_ids, ids_per_call)
            t0 = time.perf_counter()
            try:
                probs = client.predict(MODEL_ID, ids)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, the load goes on
                details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                problem = f"{type(exc).__name__}: {details}"
            else:
                want = np.array([reference[i] for i in ids])
                ok = probs.shape == want.shape and np.allclose(probs, want, rtol=0, atol=1e-12)
                problem = "" if ok else f"reply differs from the reference prediction for ids {ids[:3]}..."
            done = time.perf_counter()
            stats.latencies_s.append(done - t0)
            stats.last_done = done
            if problem:
                stats.errors += 1
                if len(stats.error_samples) < MAX_ERROR_SAMPLES:
                    stats.error_samples.append(problem)


def _peak_memory(fed: LocalFederation) -> dict[str, Any]:
    main = {name: peak_rss_bytes(svc.proc.pid) for name, svc in fed.services.items()}
    workers: dict[str, dict[str, int]] = {}
    for name, svc in fed.services.items():
        peaks = [m for m in (peak_rss_bytes(pid) for pid in descendants(svc.proc.pid)) if m is not None]
        if peaks:
            workers[name] = {"processes": len(peaks), "sum_bytes": sum(peaks)}
    return {"peak_memory_bytes": main, "peak_memory_workers": workers}


def run_load(
    key_bits: int = 2048,
    backend: str = DEFAULT_BACKEND,
    clients: int = FULL["clients"],
    duration_s: float = FULL["duration_s"],
    ids_per_call: int = IDS_PER_CALL,
    epochs: int = EPOCHS,
) -> dict[str, Any]:
    """Train, then load; returns the record (without the harness's stamps)."""
    data = bundled_data_dir()
    active, passive = data / "breast_hetero_guest.csv", data / "breast_hetero_host.csv"
    train_ids, test_ids, _ = split_ids(active, "id", "y", 0.2, 42)
    with tempfile.TemporaryDirectory(prefix="vfl-bench-load-") as tmp:
        fed = LocalFederation(
            Path(tmp),
            active,
            passive,
            key_bits=key_bits,
            # The load test scores the held-out ids over and over: B's budgets are for peers, not for this.
            extra_env={
                "VFL_BACKEND": backend,
                "VFL_PREDICT_IDS_PER_WINDOW": "1000000000",
                "VFL_MAX_PREDICT_IDS_PER_MODEL": "1000000000",
            },
            tls=False,
        )
        t0 = time.perf_counter()
        with fed, VflClient(fed.active_address, timeout_s=3600) as client:
            client.wait_ready(60)
            startup_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            client.start_training(job_config(**CONFIG, epochs=epochs), train_ids, job_id=MODEL_ID, holdout_ids=test_ids)
            final = client.wait(MODEL_ID)
            train_s = time.perf_counter() - t1
            if final.state != client_pb2.JOB_STATE_SUCCEEDED:
                raise LoadFailed(f"training {STATE_NAMES[final.state]}: {final.error}")
            reference = dict(zip(test_ids, client.predict(MODEL_ID, test_ids).tolist(), strict=True))

            stats = [ClientStats() for _ in range(clients)]
            deadline = [float("inf")]
            window: list[float] = []

            def open_window() -> None:  # run once, when every client is connected
                window.append(time.perf_counter())
                deadline[0] = window[0] + duration_s

            start = threading.Barrier(clients + 1, action=open_window)
            threads = [
                threading.Thread(
                    target=_client_loop,
                    args=(fed.active_address, test_ids, reference, ids_per_call, 1000 + i, start, deadline, stats[i]),
                    name=f"load-client-{i}",
                    daemon=True,
                )
                for i in range(clients)
            ]
            for t in threads:
                t.start()
            try:
                start.wait(120)
            except threading.BrokenBarrierError:
                raise LoadFailed("a client could not connect to the active party") from None
            began = window[0]
            for t in threads:
                t.join(duration_s + 120)
            hung = sum(t.is_alive() for t in threads)
            memory = _peak_memory(fed)
    ended = max((s.last_done for s in stats), default=began)
    wall_s = max(ended - began, 1e-9)
    latencies = sorted(x for s in stats for x in s.latencies_s)
    calls = len(latencies)
    errors = sum(s.errors for s in stats) + hung
    ok_calls = calls - sum(s.errors for s in stats)
    samples = [m for s in stats for m in s.error_samples][:MAX_ERROR_SAMPLES]
    if hung:
        samples.append(f"{hung} client thread(s) still in a call {duration_s + 120:.0f} s after the load ended")
    return {
        "name": "load",
        "case": "",
        "backend": backend,
        "key_bits": key_bits,
        "tls": False,
        "params": {
            "clients": clients,
            "duration_s": duration_s,
            "ids_per_call": ids_per_call,
            "epochs": epochs,
            "train_rows": len(train_ids),
            "test_ids": len(test_ids),
        },
        "config": job_config(**CONFIG, epochs=epochs).model_dump(),
        "startup_s": round(startup_s, 3),
        "train_s": round(train_s, 3),
        "iterations": int(final.iteration),
        "wall_s": round(wall_s, 3),
        "requests": calls,
        "errors": errors,
        "error_samples": samples,
        "predictions": ok_calls * ids_per_call,
        "calls_per_s": round(ok_calls / wall_s, 2),
        "predictions_per_s": round(ok_calls * ids_per_call / wall_s, 1),
        "latency_ms": {
            "p50": round(1000 * _percentile(latencies, 50), 2),
            "p95": round(1000 * _percentile(latencies, 95), 2),
            "p99": round(1000 * _percentile(latencies, 99), 2),
            "max": round(1000 * latencies[-1], 2) if latencies else None,
            "mean": round(1000 * statistics.fmean(latencies), 2) if latencies else None,
        },
        **memory,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['clients']} clients for {QUICK['duration_s']} s")
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--backend", default=DEFAULT_BACKEND)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--duration", type=float)
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    record = run_load(
        key_bits=args.key_bits,
        backend=args.backend,
        clients=args.clients or int(mode["clients"]),
        duration_s=args.duration or float(mode["duration_s"]),
    )
    json.dump(record, sys.stdout, indent=1)
    print()
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
