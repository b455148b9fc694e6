"""BENCHMARKS.md and the scaling plot, generated from the results file only:
every figure in them is a measured one, or arithmetic on measured ones.

`python -m benchmarks.report [--quick]` regenerates them without running anything.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import parties, parties_services, poly_cost, psi_federation, quality, results, scale
from benchmarks import psi as psi_bench
from benchmarks.results import Record

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTY_ORDER = ("active", "assistant", "passive")
SHORT = {"active": "A", "assistant": "C", "passive": "B"}
PHASE_ORDER = (
    "encrypt",
    "matvec",
    "mask",
    "decrypt",
    "serialise",
    "network",
    "rpc_wait",
    "rpc_background",
    "handler_steps",
    "handler",
)


def _with_network(phases: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """A's network estimate: its wait inside the step calls minus B's time in
    those handlers (what is left is the wire and the assistant's tunnel)."""
    a, b = phases.get("active"), phases.get("passive")
    if not a or not b or "rpc_wait" not in a or "handler_steps" not in b:
        return phases
    return {**phases, "active": {**a, "network": max(0.0, a["rpc_wait"] - b["handler_steps"])}}


@dataclass(frozen=True)
class Paths:
    results: Path
    report: Path
    plot: Path

    @classmethod
    def for_mode(cls, quick: bool) -> Paths:
        # Quick figures (512-bit keys, tiny data) live in their own files so
        # that they can never overwrite the real ones.
        if quick:
            return cls(HERE / "results-quick.json", HERE / "BENCHMARKS-quick.md", HERE / "scaling-quick.png")
        return cls(HERE / "results.json", ROOT / "BENCHMARKS.md", HERE / "scaling.png")


# --- formatting ------------------------------------------------------------------


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _memory(r: Record) -> str:
    """Each service's peak, with its child processes' (crypto workers') summed peaks if any."""
    main = r.get("peak_memory_bytes") or {}
    workers = r.get("peak_memory_workers") or {}
    parts = []
    for p in PARTY_ORDER:
        if p not in main:
            continue
        text = f"{SHORT[p]} {_mib(main[p])}"
        if p in workers:
            text += f" (+{workers[p]['processes']} child processes {_mib(workers[p]['sum_bytes'])})"
        parts.append(text)
    return " / ".join(parts) or "-"


def _per_party(values: dict[str, Any] | None, fmt: Any) -> str:
    """'A 1.2 / C 0.3 / B 4.5' for the parties present."""
    if not values:
        return "-"
    return " / ".join(f"{SHORT.get(p, p)} {fmt(values[p])}" for p in PARTY_ORDER if p in values)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# --- sections --------------------------------------------------------------------


def _measured(records: list[Record], name: str) -> list[Record]:
    return [r for r in records if r.get("name") == name and "error" not in r and "skipped" not in r]


def _problems(records: list[Record], name: str) -> list[str]:
    out = []
    for r in records:
        if r.get("name") != name:
            continue
        case = f" {r['case']}" if r.get("case") else ""
        if "skipped" in r:
            out.append(f"- not measured: `{r['backend']}`{case} ({r['skipped']})")
        elif "error" in r:
            first = str(r["error"]).splitlines()[0]
            out.append(f"- failed: `{r['backend']}`{case}: {first}")
    return out


def _ratio(r: Record) -> str:
    if r.get("ratio_vs_phe") is None:
        return "-"
    if r["backend"] == "phe":
        return "reference"
    basis = " (per it.)" if r.get("ratio_basis") == "per_iteration_s" else ""
    return f"{r['ratio_vs_phe']:.2f}×{basis}"


def _run_table(runs: list[Record]) -> list[str]:
    header = [
        "backend",
        "key bits",
        "train rows",
        "iterations",
        "wall s",
        "s / iteration",
        "median iteration s",
        "start-up s",
        "predict s",
        "AUC",
        "ratio vs phe",
        "MB sent",
        "peak memory MiB",
    ]
    rows = [
        [
            f"`{r['backend']}`",
            str(r["key_bits"]),
            _num(r.get("train_rows")),
            str(r["iterations"]),
            _num(r["wall_s"], 1),
            _num(r["per_iteration_s"], 3),
            _num(r.get("iteration_s_median"), 3),
            _num(r["startup_s"], 1),
            _num(r.get("predict_s"), 1),
            _num(r["auc"], 4),
            _ratio(r),
            _per_party(r.get("bytes_sent"), _mb),
            _memory(r),
        ]
        for r in runs
    ]
    return _table(header, rows)


def _phase_table(runs: list[Record]) -> list[str]:
    with_phases = [r for r in runs if r.get("phases")]
    if not with_phases:
        return [
            "Phase split: not recorded — the services' model shards carry no `metrics.phases_s` for these runs.",
        ]
    names = {k for r in with_phases for p in _with_network(r["phases"]).values() for k in p}
    columns = [p for p in PHASE_ORDER if p in names] + sorted(names - set(PHASE_ORDER))
    rows = []
    for r in with_phases:
        derived = _with_network(r["phases"])
        for party in PARTY_ORDER:
            phases = derived.get(party)
            if phases is None:
                continue
            elapsed = r.get("shard_elapsed_s", {}).get(party)
            rows.append(
                [f"`{r['backend']}`", SHORT[party]] + [_num(phases.get(c), 2) for c in columns] + [_num(elapsed, 2)]
            )
    return [
        "Phase split per party, in seconds, as each party recorded it in its model shard (`vfl/common/metrics.py` "
        "defines the phases; they can overlap, e.g. time waiting on the peer contains the peer's work, so "
        "they need not add up to the elapsed time). *network* is derived: A's rpc_wait (inside the step "
        "calls) minus B's handler_steps (inside those handlers), i.e. the wire, gRPC and the assistant's tunnel:",
        "",
        *_table(["backend", "party", *columns, "party's elapsed s"], rows),
    ]


def _notes(runs: list[Record]) -> list[str]:
    out = [f"- `{r['backend']}`: {r['subset']}" for r in runs if r.get("subset")]
    missing = sorted({m for r in runs for m in r.get("metrics_missing", [])})
    if missing:
        out.append(f"- not in the model shards of some runs (not recorded by the services): {', '.join(missing)}")
    return out


def _config_line(runs: list[Record]) -> str:
    cfg = runs[0]["config"]
    keys = ("epochs", "batch_size", "learning_rate", "l2", "seed", "loss_every")
    return "Config: " + ", ".join(f"{k} {cfg[k]}" for k in keys if k in cfg) + "."


def _federation_section(records: list[Record], name: str, title: str, blurb: str) -> list[str]:
    runs = _measured(records, name)
    lines = [f"## {title}", "", blurb, ""]
    if runs:
        held_out = max(r["test_rows"] for r in runs)
        lines += [_config_line(runs) + f" Held-out rows scored for the AUC: {held_out}.", ""]
        lines += [*_run_table(runs), "", *_phase_table(runs), ""]
    lines += _notes(runs) + _problems(records, name)
    if not runs and not _problems(records, name):
        lines.append("Not run yet.")
    return lines + [""]


def _primitives_section(records: list[Record]) -> list[str]:
    runs = _measured(records, "primitives")
    lines = [
        "## Primitives",
        "",
        "Vectors of 64 plaintexts (|v| < 2^31, as the protocol's residuals); the product is a 20 x 64 "
        "integer matrix (|x| < 2^23, as fixed-point features) times 64 ciphertexts. Rates are the mean "
        "over repeated calls after a warm-up of the same length; every product was decrypted and checked "
        "against M v first. HEU rows use `heu.numpy` with an integer encoder of scale 1.",
        "",
    ]
    if not runs and not _problems(records, "primitives"):
        return lines + ["Not run yet.", ""]
    if runs:
        header = [
            "backend",
            "key bits",
            "encrypt / s",
            "decrypt / s",
            "matvec 20x64 ms",
            "key gen s",
            "vs phe (enc / dec / matvec)",
        ]
        rows = []
        for r in runs:
            ratio = r.get("op_ratio_vs_phe")
            rel = "-" if not ratio else f"{ratio['encrypt']:.2f} / {ratio['decrypt']:.2f} / {ratio['matvec']:.2f}"
            rows.append(
                [
                    f"`{r['backend']}`",
                    str(r["key_bits"]),
                    _num(r["encrypt_per_s"], 0),
                    _num(r["decrypt_per_s"], 0),
                    _num(r["matvec_ms"], 1),
                    _num(r.get("keygen_s"), 2),
                    rel,
                ]
            )
        lines += _table(header, rows)
        uniform = [r for r in runs if r.get("encrypt_uniform_per_s") is not None]
        if uniform:
            lines += [
                "",
                "Encryptions of residues uniform mod n (the masks): "
                + ", ".join(f"`{r['backend']}` {r['encrypt_uniform_per_s']:,.0f} / s" for r in uniform)
                + ".",
            ]
    for r in runs:
        if r.get("large_matvec_pool_ms"):
            lines += [
                "",
                f"A large product, {r['large_matvec_shape']} (`{r['backend']}`): "
                f"{r['large_matvec_serial_ms']:,.1f} ms in the process, {r['large_matvec_pool_ms']:,.1f} ms split "
                f"across a process pool of {r['pool_workers']} workers "
                f"({r['large_matvec_serial_ms'] / r['large_matvec_pool_ms']:.2f}x; "
                "`vfl.common.crypto.multiexp.ParallelMatvec`, used by the services for products this large).",
            ]
    if any(r.get("randomness_pool_paused") for r in runs):
        lines += [
            "",
            "The project's backends were timed with their idle-time randomness precomputation paused "
            "(`vfl.common.crypto.pool.GATE` held busy) and drained by the warm-up: these are the rates of "
            "encrypting with the randomness computed inline. In the federation runs above the pool is on.",
        ]
    lines += ["", *_problems(records, "primitives")]
    return lines + [""]


SWEEP_AXES = {
    # sweep: (what varies, table column, the params that stay fixed)
    "batch": ("Batch rows", "batch rows", ("p_active", "p_passive")),
    "features": ("Features per party", "features A + B", ("batch_size",)),
    "rows": ("Data-set rows", "data-set rows", ("batch_size", "p_active", "p_passive")),
}


def _fixed(points: list[Record], keys: Sequence[str]) -> str:
    """'batch 1024' / '10 + 10 features': the values a sweep held fixed."""
    values = {k: sorted({r["params"][k] for r in points}) for k in keys}
    parts = []
    if "batch_size" in values:
        parts.append("batch " + "/".join(map(str, values["batch_size"])))
    if "p_active" in values:
        parts.append(f"{'/'.join(map(str, values['p_active']))} + {'/'.join(map(str, values['p_passive']))} features")
    return ", ".join(parts)


def _sweep_points(runs: list[Record], sweep: str) -> list[Record]:
    return [r for r in runs if r["params"].get("sweep") == sweep]


def _sweep_table(points: list[Record], column: str) -> list[str]:
    rows = [
        [
            r["case"].split("=", 1)[1],
            str(r["iterations"]),
            _num(r["wall_s"], 2),
            _num(r["per_iteration_s"], 3),
            _num(r.get("iteration_s_median"), 3),
            _per_party(r.get("bytes_sent"), _mb),
            _memory(r),
        ]
        for r in points
    ]
    header = [column, "iterations", "wall s", "s / iteration", "median iteration s", "MB sent", "peak memory MiB"]
    return _table(header, rows)


def _sweep_caveats(runs: list[Record]) -> list[str]:
    fallback = [r for r in runs if r.get("subset") and "not accepted" in r["subset"]]
    if not fallback:
        return []
    return [
        "- max_iterations was not accepted by the code measured, so each point trained one epoch on its first "
        "iterations x batch training ids instead of stopping early; in the data-set rows sweep the parties "
        "still load every row, but the job's per-iteration work only sees that subset.",
    ]


def _sweep_section(records: list[Record], plot_link: str | None) -> list[str]:
    runs = _measured(records, "sweep")
    lines = ["## Scaling sweep", ""]
    if not runs:
        return lines + (_problems(records, "sweep") or ["Not run yet."]) + [""]
    backends = sorted({r["backend"] for r in runs})
    its = sorted({r["iterations"] for r in runs})
    lines += [
        f"Backend {', '.join(f'`{b}`' for b in backends)}, {runs[0]['key_bits']}-bit keys, "
        f"{'/'.join(map(str, its))} iterations per point; time per iteration = wall / iterations "
        "(job set-up included).",
        "",
    ]
    if plot_link:
        lines += [f"![time per iteration vs batch rows and features]({plot_link})", ""]
    for sweep, (title, column, fixed) in SWEEP_AXES.items():
        points = _sweep_points(runs, sweep)
        if points:
            lines += [f"### {title} ({_fixed(points, fixed)})", "", *_sweep_table(points, column), ""]
    return lines + _sweep_caveats(runs) + _problems(records, "sweep") + [""]


def _load_section(records: list[Record]) -> list[str]:
    runs = _measured(records, "load")
    lines = ["## Prediction under load", ""]
    if not runs:
        return lines + (_problems(records, "load") or ["Not run yet."]) + [""]
    p = runs[0]["params"]
    lines += [
        f"The breast model ({p['epochs']} epochs on the {p['train_rows']} training rows of the `vfl demo` split) "
        f"queried by {p['clients']} concurrent clients for {p['duration_s']:.0f} s: threads of one process, each "
        f"with its own `VflClient` (its own channel), calling Predict back to back on {p['ids_per_call']} ids "
        f"drawn at random from the {p['test_ids']} held-out ids (`benchmarks/load.py`). Each call goes A -> C -> B "
        "and back over gRPC on loopback (plaintext, as above); every reply was checked against a reference "
        "prediction of the same ids, and an error is a failed call or a differing reply. Latency is per call "
        "as the client sees it (waiting for one of A's server threads included); throughput is over the load "
        "window, from the first call to the last reply.",
        "",
    ]
    header = [
        "backend",
        "key bits",
        "clients",
        "s",
        "calls",
        "errors",
        "predictions / s",
        "calls / s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "peak memory MiB",
    ]
    rows = [
        [
            f"`{r['backend']}`",
            str(r["key_bits"]),
            str(r["params"]["clients"]),
            _num(r["wall_s"], 1),
            f"{r['requests']:,}",
            str(r["errors"]),
            _num(r["predictions_per_s"], 0),
            _num(r["calls_per_s"], 1),
            _num(r["latency_ms"]["p50"], 1),
            _num(r["latency_ms"]["p95"], 1),
            _num(r["latency_ms"]["p99"], 1),
            _num(r["latency_ms"]["max"], 1),
            _memory(r),
        ]
        for r in runs
    ]
    return lines + _table(header, rows) + ["", *_problems(records, "load"), ""]


def _soak_section(records: list[Record]) -> list[str]:
    runs = _measured(records, "soak")
    lines = ["## Soak through a faulty network", ""]
    if not runs:
        return lines + (_problems(records, "soak") or ["Not run yet."]) + [""]
    r = runs[0]
    p, jobs, pred = r["params"], r["jobs"], r["predictions"]
    f = p["faults"]
    injected = {k: sum(link[k] for link in r["proxy"].values()) for k in ("resets", "stalls", "truncations")}
    lines += [
        f"`benchmarks/soak.py`: {r['wall_s'] / 60:.0f} minutes of training jobs back to back "
        f"({r['config']['epochs']} epochs, batch {r['config']['batch_size']}, on the {p['train_rows']} training rows) "
        f"and {p['clients']} concurrent prediction clients ({p['ids_per_call']} held-out ids per call), all through "
        "a fault-injecting proxy (`tests/faultproxy.py`) on A -> C and on C -> B, both directions: latency "
        f"{1000 * f['latency_s']:g} ms +- {1000 * f['jitter_s']:g} ms, RST resets (p {f['reset_p']:g} per chunk, "
        f"{f['reset_conn_p']:g} per connection), stalls of {f['stall_s']:g} s (p {f['stall_p']:g} per chunk), "
        f"truncated writes (p {f['truncate_p']:g} per chunk). Injected: {injected['resets']} resets, "
        f"{injected['stalls']} stalls, {injected['truncations']} truncations. Each stored model was checked against "
        "the plaintext run from its shards' initial weights, each answer against the reference model's scores from "
        "a clean call. Memory (VmRSS), open fds and threads of each service were sampled every "
        f"{p['sample_every_s']:g} s; growth is judged on the slope over the second half of the samples.",
        "",
    ]
    header = ["backend", "key bits", "minutes", "jobs ok", "jobs failed", "wrong models", "hangs"]
    header += ["Predict calls", "ids served", "calls failed", "wrong answers", "verdict"]
    row = [
        f"`{r['backend']}`",
        str(r["key_bits"]),
        _num(r["wall_s"] / 60, 1),
        str(jobs["completed"]),
        str(jobs["failed"]),
        str(jobs["wrong_models"]),
        str(jobs["hangs"]),
        f"{pred['calls']:,}",
        f"{pred['served_ids']:,}",
        str(pred["failed_calls"]),
        str(pred["wrong_answers"]),
        r["growth_verdict"],
    ]
    lines += _table(header, [row]) + [""]

    def trio(m: dict[str, Any], fmt: Any) -> str:
        return f"{fmt(m['start'])} / {fmt(m['end'])} / {fmt(m['max'])}"

    def slope(m: dict[str, Any], scale: float = 1.0) -> str:
        if m["slope_per_h"] is None:
            return "-"
        return f"{m['slope_per_h'] / scale:+.1f}" + (" (growth)" if m["growing"] else "")

    res_rows = []
    for party in PARTY_ORDER:
        m = r["resources"].get(party)
        if m is None:
            continue
        res_rows.append(
            [
                SHORT[party],
                trio(m["rss_bytes"], _mib),
                slope(m["rss_bytes"], 2**20),
                trio(m["fds"], str),
                slope(m["fds"]),
                trio(m["threads"], str),
                slope(m["threads"]),
                trio(m["children_rss_bytes"], _mib),
            ]
        )
    res_header = ["service", "RSS MiB start / end / max", "MiB / h", "fds start / end / max", "fds / h"]
    res_header += ["threads start / end / max", "threads / h", "child processes' RSS MiB"]
    lines += _table(res_header, res_rows) + [""]
    for what, reasons in (("Failed jobs", jobs["failed_reasons"]), ("Failed Predict calls", pred["failed_reasons"])):
        if reasons:
            lines.append(f"{what}, by reason: " + "; ".join(f"{n}x `{k}`" for k, n in reasons.items()) + ".")
    return lines + ["", *_problems(records, "soak"), ""]


def _describe_code(code: dict[str, Any]) -> str:
    changed = code.get("uncommitted_changes") or []
    extra = f" plus uncommitted changes to {', '.join(changed)}" if changed else ""
    return f"commit {code.get('commit')}{extra}"


def _code_lines(records: list[Record]) -> list[str]:
    """Which code each workload measured (the services run the working tree)."""
    out = []
    names = [*results.ORDER, *sorted({str(r.get("name")) for r in records} - set(results.ORDER))]
    for name in names:
        recs = [r for r in records if r.get("name") == name and r.get("code")]
        if not recs:
            continue
        line = f"- {name}: {_describe_code(recs[0]['code'])}"
        moved = next((r["code_changed_to"] for r in recs if r.get("code_changed_to")), None)
        if moved:
            line += f"; the code changed while it ran (to {_describe_code(moved)}), so its runs may mix versions"
        out.append(line)
    return ["Code measured:", "", *out] if out else []


def _header(records: list[Record], quick: bool) -> list[str]:
    commands = sorted({r["command"] for r in records if "command" in r})
    dates = sorted(r["date"] for r in records if "date" in r)
    machines = {
        (m["cpu"], m["cores"], m["ram_bytes"], m.get("python"), m.get("system"))
        for r in records
        if (m := r.get("machine"))
    }
    title = "# Benchmarks" + (" (quick mode: test-size keys, tiny workloads — not representative)" if quick else "")
    lines = [
        title,
        "",
        "Generated by `benchmarks/report.py` from `benchmarks/"
        + ("results-quick.json" if quick else "results.json")
        + "`; regenerate with "
        + (
            "`python -m benchmarks.bench --quick`. "
            if quick
            else "`make bench` (all workloads) or `make bench BENCH=breast` (one). "
        )
        + "Every figure below was measured by the commands listed, on the machine listed.",
        "",
        "Commands: " + (", ".join(f"`{c}`" for c in commands) or "-"),
        "",
        "Measured: " + (f"{dates[0]} to {dates[-1]} (UTC)" if dates else "-"),
        "",
    ]
    for cpu, cores, ram, python, system in sorted(machines, key=str):
        ram_s = "?" if ram is None else f"{ram / 2**30:.1f} GiB"
        lines.append(f"Machine: {cpu}, {cores} cores, {ram_s} RAM; Python {python}; {system}.")
    lines += ["", *_code_lines(records)]
    lines += [
        "",
        "Each federation run starts B, C and A as three processes (`vfl.cli.federation.LocalFederation`, a fresh "
        "temporary directory per run), trains through the assistant over gRPC on loopback, then scores the "
        "held-out ids. *wall* runs from the StartTraining call to the end of the job's watch stream; start-up "
        "(both parties generate their keys) is separate; *median iteration* is the median gap between "
        "iteration events at the client. Peak memory is each service's VmHWM (+ child processes, such as crypto "
        "workers: the sum of their VmHWM, an upper bound on their joint peak); bytes and the phase split "
        "come from the parties' model shards when the services record them. *ratio vs phe* is phe's time "
        "divided by the backend's, both measured in the same invocation.",
        "",
    ]
    return lines


def _synthetic_title(records: list[Record]) -> str:
    runs = _measured(records, "synthetic")
    if not runs:
        return "Synthetic"
    p = runs[0]["params"]
    return f"Synthetic ({p['rows']:,} rows, {p['p_active']} + {p['p_passive']} features)"


def _synthetic_blurb(records: list[Record]) -> str:
    text = (
        "`benchmarks/synthetic.py` (seeded): labels drawn from a logistic model over the features of both "
        "parties, split 80/20 (scikit-learn, random_state 42)."
    )
    if any(r.get("subset") for r in _measured(records, "synthetic")):
        text += (
            " The phe reference runs only its first iterations (no AUC for it): its ratio compares time per "
            "iteration, measured on that subset."
        )
    return text


def render(records: list[Record], quick: bool, plot_link: str | None) -> str:
    lines = _header(records, quick)
    lines += _federation_section(
        records,
        "breast",
        "Breast (bundled data)",
        "The bundled Wisconsin breast-cancer split (A: 10 features and the label, B: 20 features), split "
        "80/20 as `vfl demo` does (scikit-learn, random_state 42).",
    )
    lines += _federation_section(records, "synthetic", _synthetic_title(records), _synthetic_blurb(records))
    lines += _primitives_section(records)
    lines += _sweep_section(records, plot_link)
    while lines and not lines[-1]:  # one blank line between sections
        lines.pop()
    lines += ["", *_load_section(records)]
    while lines and not lines[-1]:
        lines.pop()
    lines += ["", *_soak_section(records)]
    while lines and not lines[-1]:
        lines.pop()
    lines += ["", *psi_bench.report_section(records), *psi_federation.report_section(records)]
    lines += parties.report_section(records)
    lines += parties_services.report_section(records)
    while lines and not lines[-1]:
        lines.pop()
    lines += ["", *poly_cost.report_section(records)]
    while lines and not lines[-1]:
        lines.pop()
    lines += ["", *quality.report_section(records)]
    while lines and not lines[-1]:
        lines.pop()
    lines += ["", *scale.report_section(records)]
    return "\n".join(lines).rstrip() + "\n"


# --- plot ------------------------------------------------------------------------


def plot_scaling(records: list[Record], path: Path) -> bool:
    """Time per iteration vs batch rows and vs features; False if no sweep data."""
    runs = _measured(records, "sweep")
    by = {s: [r for r in runs if r["params"].get("sweep") == s] for s in ("batch", "features")}
    if not any(by.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [("batch", "batch_size", "batch rows"), ("features", "p_active", "features per party")]
    for ax, (sweep, key, xlabel) in zip(axes, panels, strict=True):
        points = by[sweep]
        for backend in sorted({r["backend"] for r in points}):
            mine = sorted((r for r in points if r["backend"] == backend), key=lambda r: r["params"][key])
            xs_b = [r["params"][key] for r in mine]
            ax.plot(xs_b, [r["per_iteration_s"] for r in mine], marker="o", label=f"{backend}: wall / iterations")
            medians = [r.get("iteration_s_median") for r in mine]
            if all(m is not None for m in medians):
                ax.plot(xs_b, medians, marker="x", linestyle="--", label=f"{backend}: median iteration")
        # Linear axes: a straight line is what "linear in rows and features" means.
        xs = sorted({r["params"][key] for r in points})
        ax.set_xticks(xs, [str(x) for x in xs], rotation=45)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        fixed = _fixed(points, SWEEP_AXES[sweep][2]) if points else ""
        ax.set_xlabel(f"{xlabel} ({fixed})" if fixed else xlabel)
        ax.set_ylabel("seconds per iteration")
        ax.grid(True, alpha=0.3)
        if points:
            ax.legend()
    bits = sorted({r["key_bits"] for r in runs})
    fig.suptitle(f"Time per training iteration ({'/'.join(map(str, bits))}-bit keys, through the assistant)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# From this line on, the report is written by hand (one-off measurements) and kept as it is.
KEEP_MARKER = "<!-- written by hand from here on: benchmarks/report.py keeps it -->"


def _kept(report: Path) -> str:
    text = report.read_text() if report.is_file() else ""
    at = text.find(KEEP_MARKER)
    return "" if at < 0 else "\n" + text[at:]


def write(paths: Paths, quick: bool) -> None:
    records = results.load(paths.results)
    link = None
    if plot_scaling(records, paths.plot):
        link = os.path.relpath(paths.plot, paths.report.parent)
    paths.report.write_text(render(records, quick, link) + _kept(paths.report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the quick-mode files")
    args = parser.parse_args()
    paths = Paths.for_mode(args.quick)
    write(paths, args.quick)
    print(f"wrote {paths.report}")


if __name__ == "__main__":
    main()
