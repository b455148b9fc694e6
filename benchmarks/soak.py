"""Soak: the federation under load through a faulty network for a long time.

A local federation (B, C and A as three processes, plaintext gRPC through the
assistant, as the other workloads) with a FaultProxy (tests/faultproxy.py) on
A -> C and on C -> B injecting moderate faults (FAULTS: latency and jitter,
rare RST resets and truncated writes, short stalls) for the whole run. It
trains the breast model once on a clean network (the reference), then, for
`duration_s`:

- one thread trains jobs back to back (StartTraining tried again on
  UNAVAILABLE, as a client would); each stored model is checked against the
  plaintext run of the same algorithm from the initial weights recorded in
  its shards (tests/reference_run.py): the weights must agree to WEIGHT_ATOL;
- `clients` threads, each its own VflClient, call Predict back to back on
  IDS_PER_CALL ids drawn from the held-out ids; every answer is checked
  against the reference model's scores from a clean call (decryption is
  exact: any difference is a wrong answer);
- every `sample_every_s` seconds, each service's resident memory (VmRSS), open
  file descriptors (/proc/<pid>/fd) and threads, and its child processes'
  summed VmRSS, are sampled.

The verdict on growth is a least-squares slope over the second half of the
samples (the first half includes warm-up: caches, pools, gRPC buffers),
called growth when it would add more than GROWTH_TOLERANCE of the metric's
mean (and more than a small absolute floor) over the whole run.

`python -m benchmarks.soak [--quick] [--minutes M]` runs it alone and prints
the record; `make bench BENCH=soak` (30 minutes; BENCH_ARGS=--quick: about 1
minute, test-size keys; VFL_SOAK_MINUTES=M sets the length) runs it through
the harness (results.json, BENCHMARKS.md). Not part of `make bench` (all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.machine import descendants
from tests.faultproxy import Faults, FaultyFederation
from tests.reference_run import reference_from_shards
from vfl.cli.client import STATE_NAMES, VflClient
from vfl.cli.main import bundled_data_dir, split_ids
from vfl.common.crypto.backend import DEFAULT_BACKEND
from vfl.common.jobconfig import JobConfig, job_config
from vfl.common.storage import read_record
from vfl.v1 import client_pb2

FULL = {"duration_s": 30 * 60.0, "sample_every_s": 60.0}
QUICK = {"duration_s": 60.0, "sample_every_s": 3.0}
CLIENTS = 16
IDS_PER_CALL = 16
# Moderate, on both links and both directions. Prediction keeps the tunnel
# busy (thousands of chunks a minute), so the per-chunk probabilities are
# small: a reset every few tens of seconds, a stall now and then.
FAULTS = Faults(
    latency_s=0.002,
    jitter_s=0.001,
    reset_p=2e-4,
    reset_conn_p=0.05,
    reset_within_s=5.0,
    stall_p=5e-4,
    stall_s=0.5,
    truncate_p=1e-4,
    seed=7,
)
MODEL_ID = "soak-model"
TRAIN_CONFIG: dict[str, Any] = {"epochs": 2, "batch_size": 64, "learning_rate": 0.15, "l2": 0.01, "loss_every": 1}
JOB_DEADLINE_S = 300.0
START_TRIES = 3
WEIGHT_ATOL = 1e-6  # the federated model vs the plaintext run: fixed-point rounding only
GROWTH_TOLERANCE = 0.05
# Below these a slope is noise, whatever the relative size.
GROWTH_FLOOR = {"rss_bytes": 8 << 20, "fds": 4, "threads": 4, "children_rss_bytes": 8 << 20}
MAX_SAMPLES = 5


class SoakFailed(RuntimeError):
    """The federation could not be set up for the soak (no reference model)."""


# --- what is sampled ----------------------------------------------------------------


def sample_process(pid: int) -> dict[str, int] | None:
    """VmRSS, open fds and threads of a live process, and its children's summed VmRSS."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    children = 0
    for child in descendants(pid):
        try:
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    children += int(line.split()[1]) * 1024
        except OSError:
            continue
    return {
        "rss_bytes": int(fields["VmRSS"].split()[0]) * 1024,
        "fds": fds,
        "threads": int(fields["Threads"]),
        "children_rss_bytes": children,
    }


def growth(times: list[float], values: list[float], metric: str, duration_s: float) -> dict[str, Any]:
    """Slope over the second half of the samples, per hour, and whether it is growth."""
    half = len(times) // 2
    t, v = np.asarray(times[half:]), np.asarray(values[half:], dtype=np.float64)
    if len(t) < 3 or float(np.ptp(t)) == 0.0:
        return {"slope_per_h": None, "growing": None}
    slope = float(np.polyfit(t, v, 1)[0])
    over_run = slope * duration_s
    limit = max(GROWTH_TOLERANCE * float(np.mean(v)), GROWTH_FLOOR[metric])
    return {"slope_per_h": round(slope * 3600, 1), "growing": bool(over_run > limit)}


def summarise(samples: list[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """Per service and metric: start, end, max, and the growth verdict."""
    out: dict[str, Any] = {}
    services = sorted({s for row in samples for s in row["services"]})
    for service in services:
        rows = [(row["t"], row["services"][service]) for row in samples if row["services"].get(service)]
        if not rows:
            continue
        per_metric = {}
        for metric in GROWTH_FLOOR:
            times = [t for t, _ in rows]
            values = [m[metric] for _, m in rows]
            per_metric[metric] = {
                "start": values[0],
                "end": values[-1],
                "max": max(values),
                **growth(times, values, metric, duration_s),
            }
        out[service] = per_metric
    return out


def _rate(metric: str, per_h: float) -> str:
    if metric.endswith("bytes"):
        return f"{per_h / 2**20:+.1f} MiB/h"
    return f"{per_h:+.1f}/h"


def verdict(resources: dict[str, Any]) -> str:
    grown = [
        f"{service} {metric.removesuffix('_bytes')} {_rate(metric, m['slope_per_h'])}"
        for service, metrics in resources.items()
        for metric, m in metrics.items()
        if m["growing"]
    ]
    if grown:
        return "growth: " + ", ".join(grown)
    if any(m["growing"] is None for metrics in resources.values() for m in metrics.values()):
        return "too few samples for a verdict"
    return "no growth (second-half slopes within tolerance)"


# --- the load ----------------------------------------------------------------------------


@dataclass
class Counts:
    """Shared by the threads; each field updated under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs_completed: int = 0
    jobs_failed: Counter[str] = field(default_factory=Counter)
    jobs_checked: int = 0
    wrong_models: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    start_retries: int = 0
    calls: int = 0
    served_ids: int = 0
    failed_calls: Counter[str] = field(default_factory=Counter)
    wrong_answers: int = 0
    wrong_samples: list[str] = field(default_factory=list)


def _reason(exc: grpc.RpcError) -> str:
    """A failure's code and message, without its particulars (for counting kinds)."""
    import re

    # Addresses and ids out (they differ every time), the hop and the cause kept.
    details = re.sub(r"\s*\(through the assistant at [^)]*\)", "", exc.details() or "")
    details = re.sub(r"\S*\d\S*|'[^']*'", "#", details)
    return f"{exc.code().name}: {' '.join(details.split())[:160]}"


def _start(client: VflClient, config: JobConfig, ids: list[str], job_id: str, counts: Counts) -> str | None:
    """StartTraining, tried again on UNAVAILABLE; None if started, else the last error."""
    for attempt in range(START_TRIES):
        try:
            client.start_training(config, ids, job_id=job_id)
            return None
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == START_TRIES - 1:
                return f"StartTraining {_reason(exc)}"
            with counts.lock:
                counts.start_retries += 1
            time.sleep(0.5)
    return "unreachable"


def _wait(client: VflClient, job_id: str, deadline: float) -> client_pb2.JobStatus:
    try:
        for _ in client.stub.WatchJob(
            client_pb2.WatchJobRequest(job_id=job_id), timeout=max(1.0, deadline - time.monotonic())
        ):
            pass
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return client.status(job_id)


def _check_model(fed: FaultyFederation, job_id: str, config: JobConfig, train: list[str]) -> str:
    """'' if the stored model is the plaintext run's from its shards' initial weights."""
    shards = {
        p: read_record(fed.workdir / p / "data" / "models" / f"{job_id}.json", "model") for p in ("active", "passive")
    }
    ref = reference_from_shards(shards["active"], shards["passive"], config, train)
    got = np.r_[shards["active"]["weights"], shards["active"]["intercept"], shards["passive"]["weights"]]
    worst = float(np.max(np.abs(got - np.r_[ref.w_active, ref.w_passive])))
    return "" if worst <= WEIGHT_ATOL else f"{job_id}: weights differ from the plaintext run's by up to {worst:.2e}"


def _trainer(fed: FaultyFederation, train: list[str], stop: threading.Event, counts: Counts) -> None:
    config = job_config(**TRAIN_CONFIG)
    with VflClient(fed.active_address, timeout_s=JOB_DEADLINE_S) as client:
        n = 0
        while not stop.is_set():
            n += 1
            job_id = f"soak-{n:05d}"
            deadline = time.monotonic() + JOB_DEADLINE_S
            error = _start(client, config, train, job_id, counts)
            if error is not None:
                with counts.lock:
                    counts.jobs_failed[error] += 1
                continue
            final = _wait(client, job_id, deadline)
            with counts.lock:
                if final.state == client_pb2.JOB_STATE_RUNNING:
                    counts.hangs.append(f"{job_id}: running after {JOB_DEADLINE_S:.0f} s")
                elif final.state != client_pb2.JOB_STATE_SUCCEEDED:
                    counts.jobs_failed[f"job {STATE_NAMES[final.state]}: {final.error[:100]}"] += 1
                else:
                    counts.jobs_completed += 1
            if final.state == client_pb2.JOB_STATE_SUCCEEDED:
                problem = _check_model(fed, job_id, config, train)
                with counts.lock:
                    counts.jobs_checked += 1
                    if problem:
                        counts.wrong_models.append(problem)


def _predictor(
    address: str, test: list[str], reference: dict[str, float], seed: int, stop: threading.Event, counts: Counts
) -> None:
    rng = random.Random(seed)
    with VflClient(address, timeout_s=60) as client:
        client.wait_ready(60)
        while not stop.is_set():
            ids = rng.sample(test, IDS_PER_CALL)
            try:
                probs = client.predict(MODEL_ID, ids)
            except grpc.RpcError as exc:
                with counts.lock:
                    counts.calls += 1
                    counts.failed_calls[_reason(exc)] += 1
                continue
            want = np.array([reference[i] for i in ids])
            ok = probs.shape == want.shape and bool(np.array_equal(probs, want))
            with counts.lock:
                counts.calls += 1
                if ok:
                    counts.served_ids += len(ids)
                else:
                    counts.wrong_answers += 1
                    if len(counts.wrong_samples) < MAX_SAMPLES:
                        counts.wrong_samples.append(f"ids {ids[:3]}...: {probs[:3]} != {want[:3]}")


def run_soak(
    key_bits: int = 2048,
    backend: str = DEFAULT_BACKEND,
    duration_s: float = FULL["duration_s"],
    sample_every_s: float = FULL["sample_every_s"],
    clients: int = CLIENTS,
    faults: Faults = FAULTS,
    say: Any = print,
) -> dict[str, Any]:
    """Set up, soak, and return the record (without the harness's stamps)."""
    data = bundled_data_dir()
    active, passive = data / "breast_hetero_guest.csv", data / "breast_hetero_host.csv"
    train, test, _ = split_ids(active, "id", "y", 0.2, 42)
    config = job_config(**TRAIN_CONFIG)
    with tempfile.TemporaryDirectory(prefix="vfl-bench-soak-") as tmp:
        fed = FaultyFederation(
            Path(tmp),
            active,
            passive,
            key_bits=key_bits,
            tls=False,
            # B's budgets are for peers, not for this: every held-out id scored
            # over and over, a model per job for half an hour.
            extra_env={
                "VFL_BACKEND": backend,
                "VFL_PREDICT_IDS_PER_WINDOW": "1000000000",
                "VFL_MAX_PREDICT_IDS_PER_MODEL": "1000000000",
                "VFL_MAX_MODELS_PER_PEER": "1000000",
            },
        )
        with fed, VflClient(fed.active_address, timeout_s=600) as client:
            client.wait_ready(60)
            client.start_training(config, train, job_id=MODEL_ID, holdout_ids=test)
            final = client.wait(MODEL_ID)
            if final.state != client_pb2.JOB_STATE_SUCCEEDED:
                raise SoakFailed(f"reference training {STATE_NAMES[final.state]}: {final.error}")
            reference = dict(zip(test, client.predict(MODEL_ID, test).tolist(), strict=True))
            pids = {name: svc.proc.pid for name, svc in fed.services.items()}

            fed.set_faults(faults)
            before = fed.stats()
            counts, stop = Counts(), threading.Event()
            threads = [threading.Thread(target=_trainer, args=(fed, train, stop, counts), daemon=True)]
            threads += [
                threading.Thread(
                    target=_predictor, args=(fed.active_address, test, reference, 100 + i, stop, counts), daemon=True
                )
                for i in range(clients)
            ]
            t0 = time.monotonic()
            samples: list[dict[str, Any]] = []

            def take_sample() -> None:
                row = {
                    "t": round(time.monotonic() - t0, 1),
                    "services": {n: sample_process(p) for n, p in pids.items()},
                }
                samples.append(row)

            take_sample()
            for t in threads:
                t.start()
            next_sample = t0 + sample_every_s
            while (now := time.monotonic()) < t0 + duration_s:
                time.sleep(max(0.0, min(next_sample, t0 + duration_s) - now))
                if time.monotonic() >= next_sample:
                    take_sample()
                    next_sample += sample_every_s
                    with counts.lock:
                        progress = (counts.jobs_completed, sum(counts.jobs_failed.values()), counts.calls)
                    say(
                        f"   {samples[-1]['t']:.0f} s: {progress[0]} jobs done, {progress[1]} failed, "
                        f"{progress[2]} Predict calls; A RSS "
                        f"{(samples[-1]['services']['active'] or {}).get('rss_bytes', 0) / 2**20:.0f} MiB"
                    )
            stop.set()
            for t in threads:
                t.join(JOB_DEADLINE_S + 60)
            hung_threads = sum(t.is_alive() for t in threads)
            wall_s = time.monotonic() - t0
            take_sample()  # at the end: the load stopped, the services still up
            fed.set_faults(Faults())
            links = {link: after.since(before[link]) for link, after in fed.stats().items()}
    resources = summarise(samples, wall_s)
    record: dict[str, Any] = {
        "name": "soak",
        "case": "",
        "backend": backend,
        "key_bits": key_bits,
        "tls": False,
        "params": {
            "duration_s": duration_s,
            "sample_every_s": sample_every_s,
            "clients": clients,
            "ids_per_call": IDS_PER_CALL,
            "faults": dataclasses.asdict(faults),
            "train_rows": len(train),
            "test_ids": len(test),
        },
        "config": config.model_dump(),
        "wall_s": round(wall_s, 1),
        "jobs": {
            "completed": counts.jobs_completed,
            "failed": sum(counts.jobs_failed.values()),
            "failed_reasons": dict(counts.jobs_failed.most_common()),
            "checked": counts.jobs_checked,
            "wrong_models": len(counts.wrong_models),
            "wrong_samples": counts.wrong_models[:MAX_SAMPLES],
            "hangs": len(counts.hangs),
            "start_retries": counts.start_retries,
        },
        "predictions": {
            "calls": counts.calls,
            "served_ids": counts.served_ids,
            "failed_calls": sum(counts.failed_calls.values()),
            "failed_reasons": dict(counts.failed_calls.most_common()),
            "wrong_answers": counts.wrong_answers,
            "wrong_samples": counts.wrong_samples,
        },
        "proxy": {link: dataclasses.asdict(s) for link, s in links.items()},
        "resources": resources,
        "growth_verdict": verdict(resources),
        "samples": samples,
    }
    problems = []
    if counts.wrong_answers:
        problems.append(f"{counts.wrong_answers} wrong prediction answers")
    if counts.wrong_models:
        problems.append(f"{len(counts.wrong_models)} wrong models: {counts.wrong_models[0]}")
    if counts.hangs or hung_threads:
        problems.append(f"{len(counts.hangs)} jobs hung, {hung_threads} threads still busy at the end")
    if problems:
        record["error"] = "; ".join(problems)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute, sampling every 3 s, 768-bit keys")
    parser.add_argument("--minutes", type=float, help="duration (default 30, or 1 with --quick)")
    parser.add_argument("--key-bits", type=int)
    parser.add_argument("--backend", default=DEFAULT_BACKEND)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    record = run_soak(
        key_bits=args.key_bits or (768 if args.quick else 2048),
        backend=args.backend,
        duration_s=60 * args.minutes if args.minutes else float(mode["duration_s"]),
        sample_every_s=float(mode["sample_every_s"]),
        clients=args.clients,
    )
    json.dump({k: v for k, v in record.items() if k != "samples"}, sys.stdout, indent=1)
    print()
    return 1 if "error" in record else 0


if __name__ == "__main__":
    raise SystemExit(main())
