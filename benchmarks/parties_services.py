"""`make bench BENCH=parties`, second part: the same synthetic set and
column split over the real services, A with k = 1, 2, 3, 4 passive parties
(k = 1: VFL_PEER_ADDRESS and the two-party loop; k > 1: VFL_PEERS and the
protocol sessions), each party its own process, mutual TLS over loopback,
no assistant, 2048-bit OU keys. All parties share this machine's 2 cores,
so the time per iteration is the federation's on one small machine, not
each party's alone (the in-process part gives those).
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import synthetic
from benchmarks.machine import code_version, machine_info
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.common.jobconfig import JobConfig
from vfl.common.storage import read_record
from vfl.common.tls import CLIENT_IDENTITY
from vfl.v1 import client_pb2

ROOT = Path(__file__).resolve().parent.parent
KS = (1, 2, 3, 4)
BATCH = 1024
MEASURED = 10  # iterations timed, after a warm-up one (B stores no model under 10)


def split_columns(passive_csv: Path, k: int, out: Path) -> dict[str, Path]:
    """The passive CSV's feature columns in k contiguous groups, one file each."""
    with passive_csv.open(newline="") as fh:
        rows = list(csv.reader(fh))
    groups = np.array_split(np.arange(len(rows[0]) - 1), k)
    paths = {}
    for j, cols in enumerate(groups):
        path = out / f"b{j + 1}.csv"
        with path.open("w", newline="") as fh:
            csv.writer(fh).writerows([[r[0], *(r[1 + c] for c in cols)] for r in rows])
        paths[f"b{j + 1}"] = path
    return paths


def run_k(k: int, split: synthetic.SyntheticSplit, bits: int, measured: int, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    parties = split_columns(split.passive_csv, k, workdir) if k > 1 else {}
    fed = LocalFederation(
        workdir / "fed",
        split.active_csv,
        split.passive_csv,
        key_bits=bits,
        assistant=False,
        tls=True,
        passive_parties=parties,
    )
    # Enough epochs for the iterations at any size; max_iterations stops it.
    config = JobConfig(batch_size=BATCH, epochs=100, max_iterations=measured + 1, loss_every=0, seed=1)
    events: list[float] = []

    def on_event(ev: client_pb2.JobEvent) -> None:
        if ev.state == client_pb2.JOB_STATE_RUNNING and ev.iteration > len(events):
            events.append(time.perf_counter())

    with fed, VflClient(fed.active_address, timeout_s=600, tls=fed.tls_files(CLIENT_IDENTITY)) as client:
        client.wait_ready(120)
        t0 = time.perf_counter()
        aligned = client.align(alignment_id="bench")
        align_s = time.perf_counter() - t0
        if aligned.state != client_pb2.ALIGNMENT_STATE_SUCCEEDED:
            raise RuntimeError(f"alignment failed: {aligned.error}")
        started = time.perf_counter()
        status = client.start_training(config, job_id="bench", alignment_id="bench")
        final = client.wait(status.job_id, on_event)
        if final.state != client_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"job failed: {final.error}")
        wall = time.perf_counter() - started
        names = ["active", *(sorted(parties) or ["passive"])]
        shards = {n: read_record(fed.workdir / n / "data" / "models" / "bench.json", "model") for n in names}
    gaps = [b - a for a, b in zip(events, events[1:], strict=False)]  # after the warm-up iteration
    sent = {n: s.get("metrics", {}).get("bytes_sent") for n, s in shards.items()}
    return {
        "name": "parties-services",
        "k": k,
        "rows": aligned.size,
        "batch_size": BATCH,
        "key_bits": bits,
        "iterations": len(gaps),
        "align_s": align_s,
        "wall_s": wall,
        "s_per_iteration": statistics.median(gaps),
        "bytes_sent_per_iteration": {n: (v / final.iteration if v is not None else None) for n, v in sent.items()},
        "machine": machine_info(),
        "commit": code_version(ROOT)["commit"],
    }


def workload(quick: bool) -> list[dict[str, Any]]:
    rows = 3_000 if quick else synthetic.DEFAULT_ROWS
    bits = 1024 if quick else 2048
    out = []
    with tempfile.TemporaryDirectory(prefix="vfl-bench-parties-") as tmp:
        split = synthetic.make_default(Path(tmp), rows=rows)
        for k in (1, 2) if quick else KS:
            rec = run_k(k, split, bits, MEASURED, Path(tmp) / f"k{k}")
            out.append(rec)
            print(f"parties over the services k={k}: {rec['s_per_iteration']:.3f} s/iteration", flush=True)
    return out


def report_section(records: Sequence[dict[str, Any]]) -> list[str]:
    runs = sorted(
        (r for r in records if r.get("name") == "parties-services" and "error" not in r), key=lambda r: r["k"]
    )
    lines = ["## Several passive parties over the services", ""]
    if not runs:
        return lines + ["Not run yet.", ""]
    first = runs[0]
    lines += [
        f"`make bench BENCH=parties` (`benchmarks/parties_services.py`): the same {first['rows']:,}-row synthetic set "
        f"and column split over the real services (A, and k passive services, each its own process; mutual TLS "
        f"over loopback, no assistant; k = 1 is the two-party loop, k > 1 the protocol sessions), batch "
        f"{first['batch_size']}, {first['key_bits']}-bit OU keys; median gap between iteration events at the "
        f"client over {first['iterations']} iterations after a warm-up one. Every process shares this machine's 2 "
        f"cores, so the figure is the whole federation's on one small machine. Commit {first['commit']}.",
        "",
        "| k | s / iteration | vs k = 1 | PSI with every party, s | KiB sent / iteration: A | each B_j |",
        "|---|---|---|---|---|---|",
    ]
    base = first["s_per_iteration"] if first["k"] == 1 else None
    for r in runs:
        sent = r["bytes_sent_per_iteration"]
        b_kib = ", ".join(f"{v / 1024:.0f}" if v is not None else "–" for n, v in sorted(sent.items()) if n != "active")
        a_sent = sent.get("active")
        ratio = f"{r['s_per_iteration'] / base:.2f}x" if base else "–"
        lines.append(
            f"| {r['k']} | {r['s_per_iteration']:.3f} | {ratio} | {r['align_s']:.1f} | {a_sent / 1024:.0f} | {b_kib} |"
            if a_sent is not None
            else f"| {r['k']} | {r['s_per_iteration']:.3f} | {ratio} | {r['align_s']:.1f} | – | {b_kib} |"
        )
    inproc = {r["k"]: r["wall_s_per_iteration"] for r in records if r.get("name") == "parties" and "error" not in r}
    last = runs[-1]
    compare = ""
    if base and 1 in inproc and last["k"] in inproc:
        compare = (
            f" At k = {last['k']} the services take {last['s_per_iteration'] / base:.2f}x their k = 1 time, against "
            f"{inproc[last['k']] / inproc[1]:.2f}x for the in-process sum of the parties' work: the rest is what "
            f"{last['k'] + 1} processes on 2 cores, gRPC serialisation, TLS and A's relaying add."
        )
    lines += [
        "",
        "The total work grows linearly in k (the in-process table above); here it all runs on the same two cores, "
        "so the time per iteration follows the total, while in a real federation each party's own time (the "
        "in-process columns) is what it waits for, and A's relaying grows as k (k - 1) ciphertext vectors." + compare,
        "",
    ]
    return lines
