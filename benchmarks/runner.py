"""One benchmark run of the real federation: B, C and A as separate processes
(vfl.cli.federation.LocalFederation), real gRPC through the assistant's CONNECT tunnel, one
training job started with StartTraining and followed to its end, then the
held-out ids scored with Predict.

What is measured, and where from:
- startup_s: start of the three services (each generates its key pair before
  it serves) until A's channel is ready;
- wall_s: the StartTraining call until the watch stream ends, as the client
  sees it (job set-up at both parties included; the alignment by PSI before
  it is not: BENCH=psi measures that);
- per_iteration_s: wall_s / iterations; iteration_s_median: median gap
  between consecutive iteration events at the client (set-up excluded);
- auc: sklearn's roc_auc_score of Predict on the test ids;
- peak_memory_bytes: VmHWM of each service process, read before stopping it;
- phases, bytes_sent, shard elapsed/iterations: copied from each party's model
  shard ("metrics") when the services record them, else left out.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.machine import descendants, peak_rss_bytes
from vfl.cli.client import STATE_NAMES, VflClient
from vfl.cli.federation import LocalFederation
from vfl.common.data import load_party_csv
from vfl.common.errors import VflError
from vfl.common.jobconfig import JobConfig, job_config
from vfl.common.serde import config_to_proto
from vfl.common.storage import read_record
from vfl.v1 import client_pb2

SERVICES = ("active", "assistant", "passive")
# Keys of a shard's "metrics" copied into the record, as the services name them.
SHARD_METRICS = {"phases_s": "phases", "bytes_sent": "bytes_sent", "elapsed_s": "shard_elapsed_s"}


class RunFailed(RuntimeError):
    """A federation run that did not produce a trained model."""


@dataclass(frozen=True)
class RunSpec:
    """One training job on one backend. Empty train_ids means every id at A;
    empty test_ids means no prediction (no AUC)."""

    workload: str
    case: str
    backend: str
    active_csv: Path
    passive_csv: Path
    config: Mapping[str, Any]
    train_ids: tuple[str, ...] = ()
    test_ids: tuple[str, ...] = ()
    labels: Mapping[str, float] = field(default_factory=dict)
    max_iterations: int = 0  # 0: run the whole schedule
    key_bits: int = 2048
    params: Mapping[str, Any] = field(default_factory=dict)  # what a sweep varies, for the report


@dataclass(frozen=True)
class PreparedJob:
    config: JobConfig
    train_ids: list[str]
    subset: str | None  # why and how the run is a subset of the workload, if it is


def max_iterations_support() -> str | None:
    """None when JobConfig and the TrainingConfig proto both take
    max_iterations, else why not (it is being added to both)."""
    try:
        config_to_proto(job_config(max_iterations=2))
    except (VflError, ValueError, TypeError) as exc:
        return str(exc)
    return None


def prepare_job(spec: RunSpec, max_iterations_unsupported: str | None) -> PreparedJob:
    """The job's config and training ids. A run capped at max_iterations uses
    the config field when the code has it; otherwise it trains one epoch on
    the first max_iterations * batch_size training ids, which costs the same
    per iteration (every batch has batch_size rows either way)."""
    train_ids = list(spec.train_ids)
    if spec.max_iterations <= 0:
        return PreparedJob(job_config(**spec.config), train_ids, None)
    if max_iterations_unsupported is None:
        config = job_config(**spec.config, max_iterations=spec.max_iterations)
        return PreparedJob(config, train_ids, f"stopped after max_iterations={spec.max_iterations}")
    batch = int(spec.config.get("batch_size", 64))
    pool = train_ids or load_party_csv(spec.active_csv, "id", "y").ids
    subset = pool[: spec.max_iterations * batch]
    config = job_config(**{**spec.config, "epochs": 1})
    note = (
        f"max_iterations not accepted ({max_iterations_unsupported}): 1 epoch on the first "
        f"{len(subset)} of {len(pool)} training ids instead ({spec.max_iterations} batches of {batch})"
    )
    return PreparedJob(config, subset, note)


def _subset_note(job: PreparedJob, spec: RunSpec, iterations: int) -> str | None:
    if spec.max_iterations and iterations > spec.max_iterations:
        # The field was accepted but not honoured: say so rather than hide it.
        return f"{job.subset}; but the job ran {iterations} iterations"
    return job.subset


def _read_shards(workdir: Path, job_id: str) -> dict[str, dict[str, Any]]:
    """Each party's model shard, for the parties that stored one."""
    out: dict[str, dict[str, Any]] = {}
    for name in SERVICES:
        path = workdir / name / "data" / "models" / f"{job_id}.json"
        if path.is_file():
            out[name] = read_record(path, "model")
    return out


def _metrics_fields(shards: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-party dicts of the metrics the record carries; absent ones listed."""
    metrics = {p: s.get("metrics", {}) for p, s in shards.items()}
    fields: dict[str, Any] = {"train_rows": shards.get("active", {}).get("train_rows")}
    missing = []
    for key, out_key in SHARD_METRICS.items():
        per_party = {p: m[key] for p, m in metrics.items() if key in m}
        fields[out_key] = per_party
        if not per_party:
            missing.append(key)
    fields["shard_iterations"] = {p: m["iterations"] for p, m in metrics.items() if "iterations" in m}
    fields["metrics_missing"] = missing
    return fields


def _iteration_gaps(started: float, events: list[tuple[int, float]]) -> list[float]:
    """Seconds between consecutive iterations as seen by the client."""
    times = [started] + [t for _, t in events]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def _train(
    client: VflClient, job: PreparedJob, holdout: Sequence[str] = ()
) -> tuple[client_pb2.JobStatus, float, list[float]]:
    events: list[tuple[int, float]] = []

    def on_event(ev: client_pb2.JobEvent) -> None:
        # One event per finished iteration (plus "started" and the final one).
        if ev.state == client_pb2.JOB_STATE_RUNNING and ev.iteration > (events[-1][0] if events else 0):
            events.append((ev.iteration, time.perf_counter()))

    # The alignment (PSI) first, outside wall_s: it is the same for every job
    # on these ids, and BENCH=psi measures it.
    aligned = client.align([*job.train_ids, *holdout] if job.train_ids else ())
    if aligned.state != client_pb2.ALIGNMENT_STATE_SUCCEEDED:
        raise RunFailed(f"alignment {aligned.alignment_id} failed: {aligned.error}")
    t0 = time.perf_counter()
    # The held-out ids are the job's holdout: B scores only the model's population.
    status = client.start_training(job.config, job.train_ids, holdout_ids=holdout, alignment_id=aligned.alignment_id)
    started = time.perf_counter()
    final = client.wait(status.job_id, on_event)
    wall = time.perf_counter() - t0
    if final.state != client_pb2.JOB_STATE_SUCCEEDED:
        raise RunFailed(f"job {final.job_id} {STATE_NAMES[final.state]}: {final.error}")
    return final, wall, _iteration_gaps(started, events)


def _auc(client: VflClient, model_id: str, spec: RunSpec) -> tuple[float | None, float | None]:
    if not spec.test_ids:
        return None, None
    from sklearn.metrics import roc_auc_score

    t0 = time.perf_counter()
    probs = client.predict(model_id, list(spec.test_ids))
    predict_s = time.perf_counter() - t0
    y = [spec.labels[i] for i in spec.test_ids]
    return float(roc_auc_score(y, probs)), predict_s


def _peak_memory(fed: LocalFederation) -> dict[str, Any]:
    """VmHWM of each service process, and separately the sum over its child
    processes (crypto workers; an upper bound on their joint peak, as their
    peaks need not coincide), for services that have any."""
    main: dict[str, int | None] = {}
    workers: dict[str, dict[str, int]] = {}
    for name, svc in fed.services.items():
        main[name] = peak_rss_bytes(svc.proc.pid)
        peaks = [m for m in (peak_rss_bytes(pid) for pid in descendants(svc.proc.pid)) if m is not None]
        if peaks:
            workers[name] = {"processes": len(peaks), "sum_bytes": sum(peaks)}
    return {"peak_memory_bytes": main, "peak_memory_workers": workers}


def _log_tails(workdir: Path, lines: int = 15) -> str:
    out = []
    for name in SERVICES:
        log = workdir / f"{name}.log"
        if log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {name}.log\n" + "\n".join(tail))
    return "\n".join(out)


# B's policy for measurements only: the sweep and phe's subsets run a few
# iterations, under B's default floor of 10 (which refuses such a model).
BENCH_POLICY = {"VFL_MIN_ITERATIONS": "1"}


def run(spec: RunSpec, max_iterations_unsupported: str | None) -> dict[str, Any]:
    """Run one job in a fresh temporary workdir; return its record."""
    job = prepare_job(spec, max_iterations_unsupported)
    with tempfile.TemporaryDirectory(prefix=f"vfl-bench-{spec.workload}-{spec.backend}-") as tmp:
        workdir = Path(tmp)
        # Plaintext, as the recorded results were measured (tls=True would add mutual TLS).
        fed = LocalFederation(
            workdir,
            spec.active_csv,
            spec.passive_csv,
            key_bits=spec.key_bits,
            extra_env={"VFL_BACKEND": spec.backend, **BENCH_POLICY},
            tls=False,
        )
        t0 = time.perf_counter()
        try:
            with fed, VflClient(fed.active_address, timeout_s=3600) as client:
                client.wait_ready(60)
                startup_s = time.perf_counter() - t0
                final, wall_s, gaps = _train(client, job, spec.test_ids)
                auc, predict_s = _auc(client, final.job_id, spec)
                # Before the services stop: VmHWM disappears with the process.
                memory = _peak_memory(fed)
        except Exception as exc:
            raise RunFailed(f"{spec.workload}/{spec.backend} {spec.case}: {exc}\n{_log_tails(workdir)}") from exc
        shards = _read_shards(workdir, final.job_id)
    iterations = int(final.iteration)
    return {
        "name": spec.workload,
        "case": spec.case,
        "backend": spec.backend,
        "key_bits": spec.key_bits,
        "params": dict(spec.params),
        "config": job.config.model_dump(),
        "test_rows": len(spec.test_ids),
        "startup_s": round(startup_s, 3),
        "wall_s": round(wall_s, 3),
        "iterations": iterations,
        "per_iteration_s": round(wall_s / iterations, 4) if iterations else None,
        "iteration_s_median": round(statistics.median(gaps), 4) if gaps else None,
        "predict_s": None if predict_s is None else round(predict_s, 3),
        "auc": None if auc is None else round(auc, 4),
        "ratio_vs_phe": None,
        "ratio_basis": None,
        "subset": _subset_note(job, spec, iterations),
        **memory,
        **_metrics_fields(shards),
    }
