"""Benchmark harness: `python -m benchmarks.bench --bench {all,primitives,breast,synthetic,sweep,load,soak,psi,
parties,poly5,quality,scale}` (all: every workload but the 30-minute soak).

Runs the real federation (three processes, gRPC through the assistant,
2048-bit keys) per backend, records each run in benchmarks/results.json
(replacing only the records of the workloads that ran) and regenerates
BENCHMARKS.md and benchmarks/scaling.png from that file.

--quick: 512-bit keys (768 for OU; the services' test mode), tiny workloads, the fastest
requested backend only; its figures go to benchmarks/results-quick.json and
benchmarks/BENCHMARKS-quick.md, never over the real ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report, results, runner
from benchmarks.machine import code_version, machine_info
from benchmarks.workloads import NOT_IN_ALL, WORKLOADS, Context, say
from vfl.common.crypto import get_backend

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BACKENDS = "ou,paillier,phe"
KEY_BITS = 2048
# LocalFederation turns on VFL_TEST_MODE under 2048 bits. OU's plaintext space
# is a third of its modulus, so the services refuse OU keys under 768 bits.
QUICK_KEY_BITS = 512
QUICK_KEY_BITS_BY_BACKEND = {"ou": 768}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bench", choices=["all", *WORKLOADS], default="all", help="workload to run (default all)")
    parser.add_argument(
        "--backends",
        default=DEFAULT_BACKENDS,
        help=f"comma-separated crypto backends (default {DEFAULT_BACKENDS}); unknown ones are skipped",
    )
    parser.add_argument("--quick", action="store_true", help="test-size keys, tiny workloads, fastest backend only")
    return parser.parse_args(argv)


def split_backends(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    """(available, {unavailable: why}): a backend is available when this
    checkout's get_backend knows it (the services use the same code)."""
    available, skipped = [], {}
    for name in dict.fromkeys(requested):  # de-duplicated, order kept
        try:
            get_backend(name)
        except Exception as exc:
            skipped[name] = str(exc)
        else:
            available.append(name)
    return available, skipped


def _stamp(
    records: list[dict[str, Any]], command: str, quick: bool, machine: dict[str, object], code: dict[str, object]
) -> None:
    """Where, when and on which code every record was measured. The code is
    taken before and after the workload: the services of each run start from
    the working tree, so a commit or edit in between is recorded."""
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    after = code_version(ROOT)
    for rec in records:
        rec.update(command=command, date=date, quick=quick, machine=machine, code=code)
        if after != code:
            rec["code_changed_to"] = after


def _skip_records(workload: str, skipped: dict[str, str]) -> list[dict[str, Any]]:
    # The sweep, the load and the soak use one backend by design: an absent one is not a gap there.
    if workload in ("sweep", "load", "soak", "psi", "quality", "scale"):
        return []
    return [{"name": workload, "case": "", "backend": b, "skipped": why} for b, why in skipped.items()]


def _context(args: argparse.Namespace, available: list[str], data_dir: Path) -> Context:
    limit_missing = runner.max_iterations_support()
    if limit_missing is not None:
        say(f"note: max_iterations is not supported yet ({limit_missing}); capped runs train on fewer ids instead")
    ctx = Context(
        backends=tuple(available),
        quick=args.quick,
        key_bits=KEY_BITS,
        data_dir=data_dir,
        max_iterations_unsupported=limit_missing,
    )
    if args.quick:
        # Quick mode is a smoke run: one backend, the fastest requested.
        bits = QUICK_KEY_BITS_BY_BACKEND.get(ctx.fastest, QUICK_KEY_BITS)
        ctx = dataclasses.replace(ctx, backends=(ctx.fastest,), key_bits=bits)
    return ctx


def _run_workload(workload: str, ctx: Context, skipped: dict[str, str], command: str, paths: report.Paths) -> int:
    """Run one workload, merge its records into the results file, regenerate
    the report; returns how many of its runs failed."""
    say(f"== {workload}")
    t0 = time.perf_counter()
    code = code_version(ROOT)
    records = WORKLOADS[workload](ctx) + _skip_records(workload, skipped)
    _stamp(records, command, ctx.quick, machine_info(), code)
    # Saved after each workload, so an interrupted `all` keeps what it measured.
    results.save(paths.results, results.merge(results.load(paths.results), workload, records))
    report.write(paths, ctx.quick)
    say(f"== {workload}: {time.perf_counter() - t0:.0f} s")
    return sum("error" in r for r in records)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    available, skipped = split_backends([b.strip() for b in args.backends.split(",") if b.strip()])
    for name, why in skipped.items():
        say(f"skipping backend {name!r}: not available in this checkout ({why})")
    if not available:
        print("error: none of the requested backends is available", file=sys.stderr)
        return 2
    paths = report.Paths.for_mode(args.quick)
    workloads = [w for w in WORKLOADS if w not in NOT_IN_ALL] if args.bench == "all" else [args.bench]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="vfl-bench-data-") as data_dir:
        ctx = _context(args, available, Path(data_dir))
        say(f"backends: {', '.join(ctx.backends)}; {ctx.key_bits}-bit keys; results -> {paths.results}")
        for workload in workloads:
            failed += _run_workload(workload, ctx, skipped, command, paths)
    say(f"wrote {paths.results}, {paths.report}" + (f", {paths.plot}" if paths.plot.is_file() else ""))
    if failed:
        print(f"error: {failed} run(s) failed (see above and {paths.report})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
