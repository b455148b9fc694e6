"""The benchmark workloads: what runs, on which data, with which config.

breast     the bundled data as `vfl demo` splits it, 10 epochs, every backend
synthetic  30,000 rows x (13 + 10) features, one epoch at batch 1024; the phe
           reference runs 2 iterations only (its time per iteration is compared)
sweep      the fastest backend, a few iterations per point: batch rows,
           features per party, data-set rows
primitives encrypt / decrypt / matvec rates per backend, and HEU's if present
load       the default backend: the breast model queried by 32 concurrent clients for 30 s
           (benchmarks/load.py)
soak       the default backend through a faulty network for 30 minutes: jobs back to back, 16
           prediction clients, every answer checked, memory and fds sampled (benchmarks/soak.py);
           not part of `all`
poly5      the polynomial residual (POLY5) against Taylor, per iteration, one passive party through
           the protocol sessions in-process (benchmarks/poly_cost.py)
scale      10^6 rows x (20 + 20), batch 4096: the local pool against Ray with one and two nodes,
           and a party's memory loading 10^6 rows from Parquet (benchmarks/scale.py)
quality    no federation: test AUC of the plain reference (Taylor and POLY5 residuals, a grid of
           optimisers and stopping rules) against scikit-learn on breast and the synthetic set
           (benchmarks/quality.py)
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import primitives, runner, synthetic
from vfl.cli.main import bundled_data_dir, split_ids

# Fastest first: the sweep and --quick use the first of these that is available.
SPEED_ORDER = ("ou", "paillier", "phe")
REFERENCE = "phe"

BREAST_CONFIG: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 64,
    "learning_rate": 0.15,
    "l2": 0.01,
    "seed": 42,
    "loss_every": 1,
}
SYNTHETIC_CONFIG: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 1024,
    "learning_rate": 0.15,
    "l2": 0.01,
    "seed": 42,
    "loss_every": 1,
}
PHE_SUBSET_ITERATIONS = 2


@dataclass(frozen=True)
class Context:
    """What every workload needs to know about this invocation."""

    backends: tuple[str, ...]  # available and selected, in the order given
    quick: bool
    key_bits: int
    data_dir: Path  # scratch space for generated CSVs
    max_iterations_unsupported: str | None

    @property
    def fastest(self) -> str:
        # A backend this list does not know ranks after the known ones.
        rank = {b: i for i, b in enumerate(SPEED_ORDER)}
        return min(self.backends, key=lambda b: rank.get(b, len(SPEED_ORDER)))


def say(message: str) -> None:
    print(message, flush=True)


def _run_all(ctx: Context, specs: list[runner.RunSpec]) -> list[dict[str, Any]]:
    """Run each spec; a failed run becomes a record with its error."""
    records = []
    for spec in specs:
        label = f"{spec.workload} {spec.case} [{spec.backend}, {spec.key_bits}-bit]".replace("  ", " ")
        say(f"-> {label}")
        t0 = time.perf_counter()
        try:
            rec = runner.run(spec, ctx.max_iterations_unsupported)
        except runner.RunFailed as exc:
            print(f"   FAILED after {time.perf_counter() - t0:.1f} s: {exc}", file=sys.stderr, flush=True)
            records.append({"name": spec.workload, "case": spec.case, "backend": spec.backend, "error": str(exc)})
            continue
        auc = "-" if rec["auc"] is None else f"{rec['auc']:.4f}"
        say(
            f"   {rec['iterations']} iterations in {rec['wall_s']:.1f} s ({rec['per_iteration_s']:.3f} s/it), "
            f"AUC {auc}, start-up {rec['startup_s']:.1f} s" + (f"; subset: {rec['subset']}" if rec["subset"] else "")
        )
        records.append(rec)
    return records


# --- ratios against the phe reference ------------------------------------------------


def add_ratios(records: list[dict[str, Any]]) -> None:
    """ratio_vs_phe = phe's time / the backend's time, from this invocation:
    wall time when both ran the whole job, time per iteration when either was
    capped (the phe reference on the synthetic data)."""
    ref = next((r for r in records if r.get("backend") == REFERENCE and "wall_s" in r), None)
    if ref is None:
        return
    for rec in records:
        if "wall_s" not in rec:
            continue
        if ref["subset"] or rec["subset"]:
            rec["ratio_basis"] = "per_iteration_s"
            rec["ratio_vs_phe"] = round(ref["per_iteration_s"] / rec["per_iteration_s"], 2)
        else:
            rec["ratio_basis"] = "wall_s"
            rec["ratio_vs_phe"] = round(ref["wall_s"] / rec["wall_s"], 2)


# --- breast ------------------------------------------------------------------


def breast(ctx: Context) -> list[dict[str, Any]]:
    data = bundled_data_dir()
    active, passive = data / "breast_hetero_guest.csv", data / "breast_hetero_host.csv"
    train, test, labels = split_ids(active, "id", "y", 0.2, 42)
    config = {**BREAST_CONFIG, "epochs": 2} if ctx.quick else BREAST_CONFIG
    specs = [
        runner.RunSpec(
            "breast", "", b, active, passive, config, tuple(train), tuple(test), labels, key_bits=ctx.key_bits
        )
        for b in ctx.backends
    ]
    records = _run_all(ctx, specs)
    add_ratios(records)
    return records


# --- synthetic -----------------------------------------------------------------


def synthetic_workload(ctx: Context) -> list[dict[str, Any]]:
    rows = 3_000 if ctx.quick else synthetic.DEFAULT_ROWS
    split = synthetic.make_default(ctx.data_dir / f"synthetic-{rows}", rows=rows)
    train, test, labels = split_ids(split.active_csv, "id", "y", 0.2, 42)
    config = {**SYNTHETIC_CONFIG, "batch_size": 256} if ctx.quick else SYNTHETIC_CONFIG
    params = {"rows": rows, "p_active": split.p_active, "p_passive": split.p_passive}
    specs = []
    for b in ctx.backends:
        # The reference is too slow for the whole epoch next to a fast backend:
        # it runs 2 iterations, and only its time per iteration is compared.
        capped = b == REFERENCE and not ctx.quick
        specs.append(
            runner.RunSpec(
                "synthetic",
                "",
                b,
                split.active_csv,
                split.passive_csv,
                config,
                tuple(train),
                () if capped else tuple(test),
                labels,
                max_iterations=PHE_SUBSET_ITERATIONS if capped else 0,
                key_bits=ctx.key_bits,
                params=params,
            )
        )
    records = _run_all(ctx, specs)
    add_ratios(records)
    return records


# --- sweep -------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    sweep: str  # "batch", "features" or "rows"
    rows: int
    p_active: int
    p_passive: int
    batch_size: int

    @property
    def case(self) -> str:
        value = {
            "batch": self.batch_size,
            "features": f"{self.p_active}+{self.p_passive}",
            "rows": self.rows,
        }[self.sweep]
        return f"{self.sweep}={value}"


def sweep_points(quick: bool) -> list[SweepPoint]:
    """Data sets are large enough for the iterations at every point."""
    if quick:
        return (
            [SweepPoint("batch", 1_200, 10, 10, b) for b in (64, 128, 256)]
            + [SweepPoint("features", 600, p, p, 128) for p in (5, 10, 20)]
            + [SweepPoint("rows", n, 10, 10, 64) for n in (500, 2_000)]
        )
    return (
        [SweepPoint("batch", 20_000, 10, 10, b) for b in (256, 512, 1024, 2048, 4096)]
        + [SweepPoint("features", 5_000, p, p, 1024) for p in (10, 25, 50, 100, 200)]
        + [SweepPoint("rows", n, 10, 10, 256) for n in (1_000, 10_000, 100_000)]
    )


def _sweep_spec(ctx: Context, point: SweepPoint, backend: str, iterations: int) -> runner.RunSpec:
    out = ctx.data_dir / f"sweep-{point.rows}-{point.p_active}-{point.p_passive}"
    if not (out / "passive.csv").is_file():
        synthetic.make_split(point.rows, point.p_active, point.p_passive, 11, out)
    config = {
        **SYNTHETIC_CONFIG,
        "batch_size": point.batch_size,
        # The leakage guard wants 3 * max(p_A, p_B) rows; the sweep measures cost, not a deployment.
        "allow_small_batch": point.batch_size < 3 * max(point.p_active, point.p_passive),
    }
    params = {
        "sweep": point.sweep,
        "rows": point.rows,
        "p_active": point.p_active,
        "p_passive": point.p_passive,
        "batch_size": point.batch_size,
    }
    return runner.RunSpec(
        "sweep",
        point.case,
        backend,
        out / "active.csv",
        out / "passive.csv",
        config,
        max_iterations=iterations,
        key_bits=ctx.key_bits,
        params=params,
    )


def sweep(ctx: Context) -> list[dict[str, Any]]:
    backend = ctx.fastest
    if backend == REFERENCE and not ctx.quick:
        say(f"note: no faster backend than {REFERENCE} is available; the sweep runs on {REFERENCE}")
    iterations = 2 if ctx.quick else 4
    specs = [_sweep_spec(ctx, p, backend, iterations) for p in sweep_points(ctx.quick)]
    return _run_all(ctx, specs)


# --- primitives ------------------------------------------------------------------


def _primitive(name: str, measure: Callable[[], dict[str, Any]], bits: int, outside: bool = False) -> dict[str, Any]:
    """One backend's rates. A failure of the project's backend is an error;
    one of an outside reference (HEU refuses OU keys under 1024 bits, say) is
    a skip, so that it cannot fail the run."""
    say(f"-> primitives [{name}, {bits}-bit]")
    base = {"name": "primitives", "case": "", "backend": name, "key_bits": bits}
    try:
        rec = {**base, **measure()}
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"   {'skipped' if outside else 'FAILED'}: {first}", file=sys.stderr, flush=True)
        return {**base, "skipped" if outside else "error": first}
    say(
        f"   encrypt {rec['encrypt_per_s']:.0f}/s, decrypt {rec['decrypt_per_s']:.0f}/s, "
        f"matvec {MATRIX_SHAPE} {rec['matvec_ms']:.1f} ms"
    )
    return rec


MATRIX_SHAPE = f"{primitives.MATRIX_ROWS}x{primitives.VECTOR}"


def primitive_rates(ctx: Context) -> list[dict[str, Any]]:
    min_s = 0.2 if ctx.quick else 2.0
    bits = ctx.key_bits
    records = [_primitive(b, functools.partial(primitives.measure_backend, b, bits, min_s), bits) for b in ctx.backends]
    for rec in records:
        if rec["backend"] == "ou" and "matvec_ms" in rec:
            say("-> primitives [ou, process pool]")
            rec.update(primitives.measure_process_pool("ou", bits, min_s))
    missing = primitives.heu_available()
    if missing is None:
        for name, schema in primitives.HEU_SCHEMAS.items():
            measure = functools.partial(primitives.measure_heu, schema, bits, min_s)
            records.append(_primitive(name, measure, bits, outside=True))
    else:
        say(f"note: HEU not measured (import heu failed: {missing})")
        records.extend(
            {"name": "primitives", "case": "", "backend": n, "skipped": f"import heu failed: {missing}"}
            for n in primitives.HEU_SCHEMAS
        )
    ref = next((r for r in records if r["backend"] == REFERENCE and "matvec_ms" in r), None)
    for rec in records:
        if ref is not None and "matvec_ms" in rec:
            rec["op_ratio_vs_phe"] = {
                "encrypt": round(rec["encrypt_per_s"] / ref["encrypt_per_s"], 2),
                "decrypt": round(rec["decrypt_per_s"] / ref["decrypt_per_s"], 2),
                "matvec": round(ref["matvec_ms"] / rec["matvec_ms"], 2),
            }
    return records


# --- load ----------------------------------------------------------------------


def load_workload(ctx: Context) -> list[dict[str, Any]]:
    """Prediction under load, on the default backend (or the fastest one
    requested). Any failed or wrong prediction makes the run an error."""
    from benchmarks import load
    from vfl.common.crypto.backend import DEFAULT_BACKEND

    backend = DEFAULT_BACKEND if DEFAULT_BACKEND in ctx.backends else ctx.fastest
    mode = load.QUICK if ctx.quick else load.FULL
    clients, duration = int(mode["clients"]), float(mode["duration_s"])
    say(f"-> load [{backend}, {ctx.key_bits}-bit]: {clients} clients x {duration:.0f} s")
    t0 = time.perf_counter()
    try:
        rec = load.run_load(key_bits=ctx.key_bits, backend=backend, clients=clients, duration_s=duration)
    except Exception as exc:
        print(f"   FAILED after {time.perf_counter() - t0:.1f} s: {exc}", file=sys.stderr, flush=True)
        return [{"name": "load", "case": "", "backend": backend, "error": str(exc)}]
    lat = rec["latency_ms"]
    say(
        f"   {rec['requests']} calls, {rec['errors']} errors, {rec['predictions_per_s']:.0f} predictions/s, "
        f"{rec['calls_per_s']:.1f} calls/s, p50/p95/p99 {lat['p50']:.0f}/{lat['p95']:.0f}/{lat['p99']:.0f} ms"
    )
    if rec["errors"]:
        rec["error"] = f"{rec['errors']} of {rec['requests']} calls failed: " + "; ".join(rec["error_samples"])
    return [rec]


# --- soak ----------------------------------------------------------------------


def soak_workload(ctx: Context) -> list[dict[str, Any]]:
    """The soak on the default backend (or the fastest requested): 30 minutes,
    or VFL_SOAK_MINUTES; --quick about one. A wrong answer or model, or a hang,
    makes the run an error (a failure with its reason under faults does not)."""
    from benchmarks import soak
    from vfl.common.crypto.backend import DEFAULT_BACKEND

    backend = DEFAULT_BACKEND if DEFAULT_BACKEND in ctx.backends else ctx.fastest
    mode = soak.QUICK if ctx.quick else soak.FULL
    minutes = os.environ.get("VFL_SOAK_MINUTES")
    duration = 60 * float(minutes) if minutes else float(mode["duration_s"])
    say(f"-> soak [{backend}, {ctx.key_bits}-bit]: {duration / 60:.0f} min through the fault proxies")
    t0 = time.perf_counter()
    try:
        rec = soak.run_soak(
            key_bits=ctx.key_bits,
            backend=backend,
            duration_s=duration,
            sample_every_s=float(mode["sample_every_s"]),
            say=say,
        )
    except Exception as exc:
        print(f"   FAILED after {time.perf_counter() - t0:.1f} s: {exc}", file=sys.stderr, flush=True)
        return [{"name": "soak", "case": "", "backend": backend, "error": str(exc)}]
    jobs, pred = rec["jobs"], rec["predictions"]
    say(
        f"   {jobs['completed']} jobs, {jobs['failed']} failed, {jobs['wrong_models']} wrong; "
        f"{pred['calls']} Predict calls, {pred['failed_calls']} failed, {pred['wrong_answers']} wrong answers; "
        f"{rec['growth_verdict']}"
    )
    return [rec]


def psi_workload(ctx: Context) -> list[dict[str, Any]]:
    """The private set intersection: in-process (benchmarks/psi.py: 10^4 and
    10^5 ids per side, and the groups considered) and through the federation
    with C (benchmarks/psi_federation.py: 10^4, 10^5, 10^6); --quick 2,000."""
    from benchmarks import psi, psi_federation

    return psi.workload(ctx.quick) + psi_federation.workload(ctx.quick)


def parties_workload(ctx: Context) -> list[dict[str, Any]]:
    """k = 1..4 passive parties through the protocol sessions, in-process
    (benchmarks/parties.py)."""
    from benchmarks import parties, parties_services

    return parties.workload(ctx.quick) + parties_services.workload(ctx.quick)


def poly5_workload(ctx: Context) -> list[dict[str, Any]]:
    """POLY5 against Taylor: A's and B's time and bytes per iteration, same
    run (benchmarks/poly_cost.py)."""
    from benchmarks import poly_cost

    say("-> poly5 [ou, protocol sessions in-process]")
    return poly_cost.workload(ctx.quick)


def scale_workload(ctx: Context) -> list[dict[str, Any]]:
    """VFL_COMPUTE=local against ray (benchmarks/scale.py)."""
    from benchmarks import scale

    say("-> scale [ou, protocol sessions in-process, local pool and Ray clusters on this machine]")
    return scale.workload(ctx.quick)


def quality_workload(ctx: Context) -> list[dict[str, Any]]:
    """Model quality (benchmarks/quality.py): the plain reference, which the
    services reproduce to 1e-4, against scikit-learn; no keys, no backend.
    --quick: a synthetic set of 3,000 rows."""
    from benchmarks import quality

    say("-> quality [plain numpy, scikit-learn]")
    return quality.workload(ctx.quick, ctx.data_dir, say)


WORKLOADS: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "primitives": primitive_rates,
    "breast": breast,
    "synthetic": synthetic_workload,
    "sweep": sweep,
    "load": load_workload,
    "soak": soak_workload,
    "psi": psi_workload,
    "parties": parties_workload,
    "poly5": poly5_workload,
    "quality": quality_workload,
    "scale": scale_workload,
}
# Too long for `make bench` (all): run on its own.
NOT_IN_ALL = ("soak",)
