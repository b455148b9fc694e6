"""The private set intersection through the real federation: A's
StartAlignment to B, tunnelled through the assistant C, mutual TLS, each
party its own process on this machine, n ids per side at 50 % overlap.

`python -m benchmarks.psi_federation --sizes 10000,100000,1000000 [--json out.json]`

Measured, in one run:
- the group's rates on one thread, first (benchmarks/psi.py's
  measure_rates), and the floor they give: 2 parties x n x (t_hash +
  2 t_mult) / cores (one hash and two scalar multiplications per id per
  party, both parties sharing this machine's cores);
- wall_s: from the StartAlignment call until GetAlignment reports the
  alignment SUCCEEDED (polled every 20 ms), as a client sees it;
- bytes each way through C (its own counters, logged when it stops: TLS
  records, i.e. points plus HTTP/2, TLS and protobuf framing);
- peak memory (VmHWM) of A and B, and their resident set before the
  alignment (the ids, features and keys they hold anyway);
- the result: |intersection| = n / 2 at both parties, the same order.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.machine import peak_rss_bytes
from benchmarks.psi import OVERLAP, measure_rates
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.common.storage import read_record
from vfl.v1 import client_pb2

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000,)
# Keys matter nothing to the PSI; 2048 bits as deployed (generated at start-up).
KEY_BITS = 2048
_C_TOTALS = re.compile(r"event=stopped tunnels=\d+ refused=\d+ a_to_b_bytes=(\d+) b_to_a_bytes=(\d+)")


def write_party_files(root: Path, n: int, overlap: float = OVERLAP) -> tuple[Path, Path]:
    """A: customers 0..n-1 (a label and one feature); B: customers
    n(1 - overlap) .. n(2 - overlap) - 1 (one feature), in another order."""
    start_b = int(n * (1 - overlap))
    active, passive = root / "active.csv", root / "passive.csv"
    with active.open("w") as f:
        f.write("id,y,x1\n")
        f.writelines(f"C{k:010d},{k & 1},{(k * 7919) % 1000 / 1000:.3f}\n" for k in range(n))
    with passive.open("w") as f:
        f.write("id,z1\n")
        f.writelines(f"C{k:010d},{(k * 104729) % 1000 / 1000:.3f}\n" for k in reversed(range(start_b, start_b + n)))
    return active, passive


def _vm(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_psi_over_grpc(n: int, rates: dict[str, Any], workdir: Path, overlap: float = OVERLAP) -> dict[str, Any]:
    active_csv, passive_csv = write_party_files(workdir, n, overlap)
    fed = LocalFederation(workdir / "fed", active_csv, passive_csv, key_bits=KEY_BITS, assistant=True, tls=True)
    with fed:
        files = fed.tls_files("client")
        with VflClient(fed.active_address, timeout_s=3600, tls=files, server_name="active") as client:
            client.wait_ready(300)
            pids = {p: fed.services[p].proc.pid for p in ("active", "passive")}
            rss_before = {p: _vm(pid, "VmRSS") for p, pid in pids.items()}
            load_before = os.getloadavg()[0]
            cpu_before = {p: _cpu_s(pid) for p, pid in pids.items()}
            t0 = time.perf_counter()
            started = client.start_alignment(alignment_id=f"bench-{n}")
            while True:
                done = client.alignment(started.alignment_id)
                if done.state != client_pb2.ALIGNMENT_STATE_RUNNING:
                    break
                time.sleep(0.02)
            wall = time.perf_counter() - t0
            if done.state != client_pb2.ALIGNMENT_STATE_SUCCEEDED:
                raise RuntimeError(f"alignment of {n} ids failed: {done.error}")
            cpu = {p: round(_cpu_s(pid) - cpu_before[p], 2) for p, pid in pids.items()}
            peaks = {p: peak_rss_bytes(pid) for p, pid in pids.items()}
            load_after = os.getloadavg()[0]
        at = {
            p: read_record(fed.workdir / p / "data" / "alignments" / f"bench-{n}.json", "alignment")
            for p in ("active", "passive")
        }
    # C logs its totals as it stops.
    totals = _C_TOTALS.search((fed.workdir / "assistant.log").read_text())
    a_to_b, b_to_a = (int(totals.group(1)), int(totals.group(2))) if totals else (None, None)
    expected = int(n * overlap)
    if done.size != expected or at["active"]["digest"] != at["passive"]["digest"]:
        raise RuntimeError(f"alignment of {n} ids: size {done.size}, expected {expected}, or the digests differ")
    cores = os.cpu_count() or 1
    floor = 2 * n * (1 / rates["hash_per_s_1_thread"] + 2 / rates["mult_per_s_1_thread"]) / cores
    return {
        "name": "psi",
        "case": f"n={n} through C",
        "backend": "ristretto255 (libsodium), 2 parties + C, mutual TLS",
        "params": {"n_per_side": n, "overlap": overlap, "cores": cores, "key_bits": KEY_BITS},
        "wall_s": round(wall, 3),
        "alignment_elapsed_s": round(done.elapsed_s, 3),
        "floor_s": round(floor, 3),
        "wall_over_floor": round(wall / floor, 2),
        "intersection": done.size,
        # CPU seconds of each party during the alignment: unlike wall_s, not
        # inflated by other load on the machine; their sum against floor_s * cores.
        "cpu_s": cpu,
        "cpu_over_group_work": round(sum(cpu.values()) / (floor * cores), 2),
        "bytes_a_to_b": a_to_b,
        "bytes_b_to_a": b_to_a,
        "bytes_per_id_each_way": None if a_to_b is None else round((a_to_b + b_to_a) / (2 * 2 * n), 1),
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peaks,
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "rates": rates,
    }


def run(sizes: Sequence[int], say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    rates = measure_rates(os.cpu_count() or 1)
    say(f"rates (1 thread): hash {rates['hash_per_s_1_thread']:,}/s, scalarmult {rates['mult_per_s_1_thread']:,}/s")
    out = []
    for n in sorted(sizes):
        with tempfile.TemporaryDirectory(prefix=f"vfl-bench-psi-{n}-") as tmp:
            say(f"-> psi through C, n={n:,} per side, {OVERLAP:.0%} overlap")
            try:
                rec = run_psi_over_grpc(n, rates, Path(tmp))
            except Exception as exc:  # a failed size is a record with its reason, the others still run
                say(f"   FAILED: {exc}")
                out.append({"name": "psi", "case": f"n={n} through C", "backend": "ristretto255", "error": str(exc)})
                continue
        mib = {p: (v or 0) / 2**20 for p, v in rec["peak_rss_bytes"].items()}
        say(
            f"   wall {rec['wall_s']:.2f} s (floor {rec['floor_s']:.2f} s, x{rec['wall_over_floor']}; "
            f"CPU A {rec['cpu_s']['active']:.1f} s + B {rec['cpu_s']['passive']:.1f} s = "
            f"x{rec['cpu_over_group_work']} of the group work); "
            f"A->B {rec['bytes_a_to_b'] or 0:,} B, B->A {rec['bytes_b_to_a'] or 0:,} B; "
            f"peak RSS A {mib['active']:.0f} MiB, B {mib['passive']:.0f} MiB"
        )
        out.append(rec)
    return out


def report_section(records: Sequence[dict[str, Any]]) -> list[str]:
    """The BENCHMARKS.md section, from the through-C psi records."""
    runs = [r for r in records if r.get("name") == "psi" and "through C" in str(r.get("case", ""))]
    lines = ["## Private set intersection through the federation", ""]
    if not runs:
        return lines + ["Not run yet.", ""]
    ok = [r for r in runs if "error" not in r]
    errors = [f"- {r['case']}: {r['error']}" for r in runs if "error" in r]
    if ok:
        rates = ok[0]["rates"]
        lines += [
            "A's StartAlignment until GetAlignment says SUCCEEDED, through the assistant C, mutual TLS, A, B and "
            f"C each a process on this machine ({ok[0]['params']['cores']} cores shared by both parties), "
            f"{ok[0]['params']['overlap']:.0%} overlap (`benchmarks/psi_federation.py`). Floor from the group's "
            f"one-thread rates in the same run ({rates['hash_per_s_1_thread']:,} hashes, "
            f"{rates['mult_per_s_1_thread']:,} scalar multiplications per s): 2 n (t_hash + 2 t_mult) / cores. "
            "CPU: user + system seconds of A and B during the alignment, against the floor's group work "
            "(floor x cores), which other load on the machine does not inflate. Bytes: C's own counters.",
            "",
            "| ids per side | intersection | wall s | floor s | wall / floor | CPU A + B s | CPU / group work "
            "| A -> B MiB | B -> A MiB | peak RSS A / B MiB (before) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ok:
            peak, before = r["peak_rss_bytes"], r["rss_before_bytes"]
            lines.append(
                f"| {r['params']['n_per_side']:,} | {r['intersection']:,} | {r['wall_s']:.2f} | {r['floor_s']:.2f} "
                f"| {r['wall_over_floor']:.2f} | {r['cpu_s']['active']:.1f} + {r['cpu_s']['passive']:.1f} "
                f"| {r['cpu_over_group_work']:.2f} | {(r['bytes_a_to_b'] or 0) / 2**20:.1f} "
                f"| {(r['bytes_b_to_a'] or 0) / 2**20:.1f} | {(peak['active'] or 0) / 2**20:.0f} / "
                f"{(peak['passive'] or 0) / 2**20:.0f} ({(before['active'] or 0) / 2**20:.0f} / "
                f"{(before['passive'] or 0) / 2**20:.0f}) |"
            )
        lines.append("")
    return lines + errors + ([""] if errors else [])


def workload(quick: bool) -> list[dict[str, Any]]:
    return run(QUICK_SIZES if quick else DEFAULT_SIZES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    records = run([int(s) for s in args.sizes.split(",")])
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
