"""What durable checkpoints cost: `python -m benchmarks.fsync_cost [--writes N]
[--dir DIR] [--before CHECKOUT --after CHECKOUT --rounds R]`.

1. One checkpoint write, as each party makes it once per iteration (A's
   state for breast at 2048 bits), timed in the file system of DIR (default
   a temporary directory; on tmpfs an fsync is free, so DIR should be where
   data directories live): A's write before this change (plain JSON, atomic
   only), the checked record atomic only, the directory flush alone (with
   those renames pending), and the record durable (the file flushed before
   the rename, its directory after).
2. With --before/--after (two checkouts, e.g. `git archive` exports of two
   commits): the breast workload, `python -m benchmarks.bench --bench breast
   --backends ou` in each, alternately, R rounds; the figures come from each
   checkout's own benchmarks/results.json (this checkout's is not touched).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import code_version, machine_info
from vfl.common.checkpoint import JobCheckpoints
from vfl.common.storage import atomic_write_text, fsync_dir

ROOT = Path(__file__).resolve().parent.parent


def active_state(iteration: int) -> dict[str, Any]:
    """A's state for breast (10 + 1 weights) at 2048 bits: z_B pending (20
    residues), the loss history so far."""
    return {
        "next_iteration": iteration,
        "w": [0.1] * 11,
        "prev_w": [0.1] * 11,
        "pending_z_b": [secrets.token_hex(256) for _ in range(20)],
        "epoch": iteration // 7,
        "loss": 0.5,
        "losses": [[i, 0.5] for i in range(iteration)],
        "released_at": -1,
        "extra_releases": 0,
    }


def time_writes(directory: Path, writes: int) -> dict[str, dict[str, float]]:
    checkpoints = JobCheckpoints(directory)
    checkpoints.save_setup("bench", {"job_id": "bench"})
    plain = directory / "jobs" / "plain.state.json"
    out: dict[str, list[float]] = {"plain_json_atomic": [], "atomic": [], "directory_flush": [], "durable": []}
    for i in range(writes):
        state = active_state(i % 70)
        # A's write before this change: plain JSON, renamed, nothing flushed.
        t0 = time.perf_counter()
        atomic_write_text(plain, json.dumps(state), durable=False)
        out["plain_json_atomic"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checkpoints.save_state("bench", state, durable=False)
        out["atomic"].append(time.perf_counter() - t0)
        # The directory flush alone, with the renames above still pending.
        t0 = time.perf_counter()
        fsync_dir(directory / "jobs")
        out["directory_flush"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checkpoints.save_state("bench", state, durable=True)
        out["durable"].append(time.perf_counter() - t0)
    checkpoints.remove("bench")
    plain.unlink()
    return {
        mode: {
            "median_ms": round(1e3 * statistics.median(v), 3),
            "p95_ms": round(1e3 * sorted(v)[int(0.95 * len(v))], 3),
            "mean_ms": round(1e3 * statistics.fmean(v), 3),
        }
        for mode, v in out.items()
    }


def breast_run(checkout: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench", "--bench", "breast", "--backends", "ou"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    subprocess.run(cmd, cwd=checkout, env=env, check=True, capture_output=True, text=True, timeout=900)
    records = json.loads((checkout / "benchmarks" / "results.json").read_text())
    (rec,) = [r for r in records if r.get("name") == "breast" and r.get("backend") == "ou"]
    keys = ("wall_s", "per_iteration_s", "iteration_s_median", "iterations", "auc")
    return {k: rec[k] for k in keys}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fsync_cost", description=__doc__)
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--before", type=Path, help="checkout without durable checkpoints at A")
    parser.add_argument("--after", type=Path, help="checkout with them")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result: dict[str, Any] = {"checkpoint_write": time_writes(Path(tmp), args.writes), "writes": args.writes}
    if args.before and args.after:
        runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for label, checkout in (("before", args.before), ("after", args.after)):
                runs[label].append(breast_run(checkout.resolve()))
        result["breast"] = {
            label: {
                "checkout": str(checkout),
                "per_iteration_s": [r["per_iteration_s"] for r in rs],
                "wall_s": [r["wall_s"] for r in rs],
                "auc": sorted({r["auc"] for r in rs}),
            }
            for (label, rs), checkout in zip(runs.items(), (args.before, args.after), strict=True)
        }
    result["machine"] = machine_info()
    result["code"] = code_version(ROOT)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
