"""The private set intersection in-process: the group's rates and the full
two-party computation of `vfl.common.psi` at n ids per side, 50 % overlap.

`python -m benchmarks.psi --sizes 10000,100000 [--json out.json]`

Measured, all in one run:
- rates: ids hashed to the group per second (SHA-512 and the one-way map),
  scalar multiplications per second, and hash+multiply (blind_ids) per
  second, on one thread and on `--threads` threads (default: every core);
- floor: 2 parties x n x (t_hash + 2 t_mult) / cores, from the one-thread
  rates: the group work of both parties spread perfectly over the cores
  they share here (each party hashes and raises its n ids, then raises the
  other's n points);
- wall: both parties' computations as the services run them, A and B each
  on its own thread with its own worker threads, concurrently: check ids,
  shuffle, blind own ids, exchange, raise the other's points, exchange,
  match, canonical order, digest. The result is checked (n/2 common ids,
  the same order and digest at both parties), so nothing fast is wrong;
- peak RSS of the process during that computation (VmHWM, reset before each
  size where the kernel allows, else the high-water mark since start) and
  the RSS before it (the ids themselves).

Not measured here: gRPC. TODO(services): add `run_psi_over_grpc(n, overlap)`,
A's StartAlignment through C to B on loopback with the same ids, and report
its wall time beside `wall_s` below (the difference is serialisation, the
1 MiB chunks and the tunnel).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import resource
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vfl.common import psi

DEFAULT_SIZES = (10_000, 100_000)
QUICK_SIZES = (2_000,)
RATE_SAMPLE = 20_000  # ids per rate measurement
OVERLAP = 0.5


def libsodium_version() -> str:
    version = psi.pysodium.sodium.sodium_version_string
    version.restype = ctypes.c_char_p
    return str(version().decode())


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ids(n: int, overlap: float = OVERLAP) -> tuple[list[str], list[str]]:
    """n ids per side, the last `overlap` of A's being B's first."""
    shift = n - int(round(n * overlap))
    return [f"customer-{i:010d}" for i in range(n)], [f"customer-{i:010d}" for i in range(shift, shift + n)]


def _best_rate(count: int, fn: Callable[[], object], repeats: int = 3) -> float:
    """count / the fastest of `repeats` timed calls (the others were
    disturbed by something else on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return count / best


def measure_rates(threads: int, sample: int = RATE_SAMPLE) -> dict[str, Any]:
    ids = [f"rate-{i}" for i in range(sample)]
    points = psi.hash_to_group(ids)
    out: dict[str, Any] = {"sample": sample, "threads": threads, "load_average_before": round(os.getloadavg()[0], 2)}
    for label, workers in (("1_thread", 1), (f"{threads}_threads", threads)):
        secret = psi.PsiSecret(workers=workers)
        out[f"hash_per_s_{label}"] = round(_best_rate(sample, lambda w=workers: psi.hash_to_group(ids, w)))
        out[f"mult_per_s_{label}"] = round(_best_rate(sample, lambda s=secret: s.blind_points(points)))
        out[f"blind_ids_per_s_{label}"] = round(_best_rate(sample, lambda s=secret: s.blind_ids(ids)))
        secret.forget()
    out["thread_speedup_mult"] = round(out[f"mult_per_s_{threads}_threads"] / out["mult_per_s_1_thread"], 2)
    return out


def _sodium_fn(name: str, *argtypes: type) -> Callable[..., int]:
    return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)((name, psi.pysodium.sodium))


def _x25519_twist_fraction(count: int) -> float:
    """Of `count` u-coordinates from SHA-256 (top bit cleared, as X25519
    reads them), the fraction whose point lies on the twist: u^3 + A u^2 + u
    a non-square mod p (Euler's criterion)."""
    import hashlib

    p, a = 2**255 - 19, 486662
    twist = 0
    for i in range(count):
        u = int.from_bytes(hashlib.sha256(b"twist-%d" % i).digest(), "little") & ((1 << 255) - 1)
        rhs = (u * u * u + a * u * u + u) % p
        twist += rhs != 0 and pow(rhs, (p - 1) // 2, p) != 1
    return twist / count


def measure_alternatives(sample: int = 5000) -> dict[str, Any]:
    """One-thread rates of the groups considered for the PSI (docs/CRYPTO.md):
    ristretto255 through pysodium's wrappers and through vfl.common.psi's
    buffers; ed25519 (from_uniform, noclamp scalarmult) through the same
    libsodium; X25519 through OpenSSL (the `cryptography` package), whose
    hash to a u-coordinate is a bare SHA-256."""
    import hashlib

    import pysodium
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    digests = [hashlib.sha512(b"alt-%d" % i).digest() for i in range(sample)]
    out: dict[str, Any] = {"sample": sample, "load_average_before": round(os.getloadavg()[0], 2)}

    # ristretto255, pysodium's own wrappers (a new ctypes buffer per call).
    scalar = pysodium.crypto_core_ristretto255_scalar_random()
    points = [pysodium.crypto_core_ristretto255_from_hash(d) for d in digests]
    out["ristretto255_pysodium_hash_per_s"] = round(
        _best_rate(sample, lambda: [pysodium.crypto_core_ristretto255_from_hash(d) for d in digests])
    )
    out["ristretto255_pysodium_mult_per_s"] = round(
        _best_rate(sample, lambda: [pysodium.crypto_scalarmult_ristretto255(scalar, p) for p in points])
    )
    ids = [f"alt-{i}" for i in range(sample)]
    secret = psi.PsiSecret(workers=1)
    joined = b"".join(points)
    out["ristretto255_common_psi_hash_per_s"] = round(_best_rate(sample, lambda: psi.hash_to_group(ids, 1)))
    out["ristretto255_common_psi_mult_per_s"] = round(_best_rate(sample, lambda: secret.blind_points(joined)))
    secret.forget()

    # ed25519: the one-way map on 32 bytes, then scalar multiplication without clamping.
    vp = ctypes.c_void_p
    from_uniform = _sodium_fn("crypto_core_ed25519_from_uniform", vp, vp)
    mult_noclamp = _sodium_fn("crypto_scalarmult_ed25519_noclamp", vp, vp, vp)
    ed_scalar = ctypes.create_string_buffer(32)
    _sodium_fn("crypto_core_ed25519_scalar_random", vp)(ed_scalar)
    buf = ctypes.create_string_buffer(32 * sample)
    res = ctypes.create_string_buffer(32 * sample)
    base, dst = ctypes.addressof(buf), ctypes.addressof(res)

    def ed_hash() -> None:
        for i, d in enumerate(digests):
            if from_uniform(base + 32 * i, d[:32]) != 0:
                raise AssertionError("ed25519 from_uniform failed")

    def ed_mult() -> None:
        for i in range(sample):
            if mult_noclamp(dst + 32 * i, ed_scalar, base + 32 * i) != 0:
                raise AssertionError("ed25519 scalarmult failed")

    out["ed25519_hash_per_s"] = round(_best_rate(sample, ed_hash))
    out["ed25519_mult_per_s"] = round(_best_rate(sample, ed_mult))

    # X25519 through OpenSSL: a key object per point, as the PSI would need.
    key = X25519PrivateKey.generate()
    us = [hashlib.sha256(d).digest() for d in digests]
    out["x25519_hash_per_s"] = round(_best_rate(sample, lambda: [hashlib.sha256(d).digest() for d in digests]))
    out["x25519_mult_per_s"] = round(
        _best_rate(sample, lambda: [key.exchange(X25519PublicKey.from_public_bytes(u)) for u in us])
    )
    out["x25519_twist_fraction"] = round(_x25519_twist_fraction(2000), 3)
    return out


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Party(threading.Thread):
    """One party's half, as the services run it: its own secret and worker
    threads. It sends its blinded ids, raises the other's points and sends
    them back (the other's tags), receives its own tags, intersects."""

    def __init__(self, name: str, ids: list[str], workers: int) -> None:
        super().__init__(name=f"psi-{name}")
        self.ids, self.workers = ids, workers
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.peer: _Party | None = None
        self.phases: dict[str, float] = {}
        self.result: tuple[list[str], bytes] | None = None
        self.error: BaseException | None = None

    def _timed(self, phase: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + time.perf_counter() - t0, 3)
        return value

    def _send(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.inbox.put(data)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by run_two_parties
            self.error = exc
            self._send(b"")  # unblock the other party
            self._send(b"")

    def _run(self) -> None:
        secret = psi.PsiSecret(self.workers)
        try:
            self._timed("check_ids", lambda: psi.check_ids(self.ids, "ids"))
            order = self._timed("shuffle", lambda: psi.random_permutation(len(self.ids)))
            shuffled = [self.ids[i] for i in order]
            self._send(self._timed("blind_own", lambda: secret.blind_ids(shuffled)))
            peer_points = self._timed("wait", self.inbox.get)
            peer_tags = self._timed("blind_peer", lambda: secret.blind_points(peer_points, "peer points"))
            self._send(peer_tags)
            own_tags = self._timed("wait", self.inbox.get)
        finally:
            secret.forget()

        def intersect() -> tuple[list[str], bytes]:
            rows = psi.canonical_order(own_tags, psi.match(own_tags, peer_tags))
            return [self.ids[int(order[i])] for i in rows], psi.digest(own_tags, rows)

        self.result = self._timed("intersect", intersect)


def run_two_parties(a: list[str], b: list[str], workers: int) -> dict[str, Any]:
    """Both parties' computations, concurrently; checked against the plain
    intersection (same ids, same order, same digest at both)."""
    party_a, party_b = _Party("active", a, workers), _Party("passive", b, workers)
    party_a.peer, party_b.peer = party_b, party_a
    t0 = time.perf_counter()
    party_a.start()
    party_b.start()
    party_a.join()
    party_b.join()
    wall = time.perf_counter() - t0
    for party in (party_a, party_b):
        if party.error is not None:
            raise RuntimeError(f"{party.name}: {party.error}") from party.error
    assert party_a.result is not None and party_b.result is not None
    (ids_a, digest_a), (ids_b, digest_b) = party_a.result, party_b.result
    expected = set(a) & set(b)
    if ids_a != ids_b or digest_a != digest_b or len(ids_a) != len(expected) or set(ids_a) != expected:
        raise AssertionError(f"PSI result differs from the plain intersection ({len(ids_a)} vs {len(expected)} ids)")
    return {
        "wall_s": round(wall, 3),
        "intersection": len(ids_a),
        "phases_s": {"active": party_a.phases, "passive": party_b.phases},
    }


def measure_size(n: int, threads: int, rates: dict[str, Any]) -> dict[str, Any]:
    a, b = _ids(n)
    reset = _reset_peak_rss()
    rss_before = _rss("VmRSS")
    load_before = os.getloadavg()[0]
    cpu_before = time.process_time()
    run = run_two_parties(a, b, threads)
    cpu = time.process_time() - cpu_before
    peak = _rss("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cores = _cores()
    t_hash = 1 / rates["hash_per_s_1_thread"]
    t_mult = 1 / rates["mult_per_s_1_thread"]
    floor = 2 * n * (t_hash + 2 * t_mult) / cores
    return {
        "name": "psi",
        "case": f"n={n}",
        "backend": f"ristretto255 (libsodium {libsodium_version()})",
        "params": {"n_per_side": n, "overlap": OVERLAP, "threads_per_party": threads, "cores": cores},
        **run,
        "floor_s": round(floor, 3),
        # CPU seconds of all threads: unlike the wall time, not inflated when
        # other processes hold the cores; compare with floor_s * cores.
        "cpu_s": round(cpu, 3),
        "group_work_s": round(floor * cores, 3),
        "wall_over_floor": round(run["wall_s"] / floor, 2),
        "ids_per_s_per_side": round(n / run["wall_s"]),
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "peak_rss_since": "this size" if reset else "process start",
        # Other work on the machine shows here (1-minute load average).
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rates": rates,
    }


def run_psi_bench(
    sizes: Sequence[int], threads: int | None = None, say: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """One record per size, ascending; the rates measured once, first, and
    copied into each record."""
    threads = threads or _cores()
    rates = measure_rates(threads)
    say(
        f"rates (1 thread / {threads} threads): hash {rates['hash_per_s_1_thread']:,} / "
        f"{rates[f'hash_per_s_{threads}_threads']:,} per s, scalarmult {rates['mult_per_s_1_thread']:,} / "
        f"{rates[f'mult_per_s_{threads}_threads']:,} per s, hash+mult {rates['blind_ids_per_s_1_thread']:,} / "
        f"{rates[f'blind_ids_per_s_{threads}_threads']:,} per s"
    )
    records = []
    for n in sorted(sizes):
        say(f"-> psi n={n:,} per side, {OVERLAP:.0%} overlap, {threads} threads per party")
        rec = measure_size(n, threads, rates)
        say(
            f"   wall {rec['wall_s']:.2f} s (floor {rec['floor_s']:.2f} s, x{rec['wall_over_floor']}), "
            f"peak RSS {rec['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
        records.append(rec)
    return records


def workload(quick: bool) -> list[dict[str, Any]]:
    """For benchmarks/workloads.py: `make bench BENCH=psi` (--quick: 2,000 ids)."""
    records = run_psi_bench(QUICK_SIZES if quick else DEFAULT_SIZES)
    alternatives = measure_alternatives(500 if quick else 5000)
    return [*records, {"name": "psi", "case": "alternatives", "backend": "", **alternatives}]


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def table(records: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per size (for the console and BENCHMARKS.md)."""
    header = [
        "n per side",
        "common",
        "wall s",
        "floor s",
        "wall / floor",
        "CPU s (group work s)",
        "load avg before / after",
        "A: blind own / peer / intersect s",
        "B: blind own / peer / intersect s",
        "RSS before MiB",
        "peak RSS MiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = [
            f"{r['params']['n_per_side']:,}",
            f"{r['intersection']:,}",
            f"{r['wall_s']:.2f}",
            f"{r['floor_s']:.2f}",
            f"{r['wall_over_floor']:.2f}",
            f"{r['cpu_s']:.1f} ({r['group_work_s']:.1f})" if "cpu_s" in r else "-",
            " / ".join(f"{x:.1f}" for x in r.get("load_average_before_after", [])) or "-",
        ]
        for party in ("active", "passive"):
            ph = r["phases_s"][party]
            cells.append(f"{ph['blind_own']:.2f} / {ph['blind_peer']:.2f} / {ph['intersect']:.2f}")
        cells += [_mib(r["rss_before_bytes"]), _mib(r["peak_rss_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_section(records: Sequence[dict[str, Any]]) -> list[str]:
    """The BENCHMARKS.md section, from the psi records of the results file."""
    psi_records = [r for r in records if r.get("name") == "psi" and "error" not in r]
    runs = [r for r in psi_records if str(r.get("case", "")).startswith("n=") and "through C" not in r["case"]]
    lines = ["## Private set intersection (in-process)", ""]
    errors = [f"- {r.get('case', '')}: {r['error']}" for r in records if r.get("name") == "psi" and "error" in r]
    if not runs:
        return lines + (errors or ["Not run yet."]) + [""]
    rates, p = runs[0]["rates"], runs[0]["params"]
    t = rates["threads"]
    lines += [
        f"`vfl.common.psi` on {runs[0]['backend']}: both parties in one process, each on its own thread with "
        f"{p['threads_per_party']} worker threads, concurrently on {p['cores']} cores, "
        f"{p['overlap']:.0%} overlap; every result checked against the plain intersection "
        "(`benchmarks/psi.py`). No gRPC: serialisation and the network come on top. "
        f"Group rates in the same run, 1 / {t} threads: hash to the group {rates['hash_per_s_1_thread']:,} / "
        f"{rates[f'hash_per_s_{t}_threads']:,} per s, scalar multiplication {rates['mult_per_s_1_thread']:,} / "
        f"{rates[f'mult_per_s_{t}_threads']:,} per s. Floor = 2 n (t_hash + 2 t_mult) / cores.",
        "",
        *table(runs),
        "",
    ]
    for alt in (r for r in psi_records if r.get("case") == "alternatives"):
        lines += [
            f"The groups considered (one thread, {alt['sample']:,} points; docs/CRYPTO.md), hash / scalar "
            "multiplication per s: "
            f"ristretto255 via vfl.common.psi {alt['ristretto255_common_psi_hash_per_s']:,} / "
            f"{alt['ristretto255_common_psi_mult_per_s']:,}, via pysodium's wrappers "
            f"{alt['ristretto255_pysodium_hash_per_s']:,} / {alt['ristretto255_pysodium_mult_per_s']:,}; "
            f"ed25519 (from_uniform, noclamp) {alt['ed25519_hash_per_s']:,} / {alt['ed25519_mult_per_s']:,}; "
            f"X25519 via OpenSSL (SHA-256 to u) {alt['x25519_hash_per_s']:,} / {alt['x25519_mult_per_s']:,}, "
            f"with {alt['x25519_twist_fraction']:.1%} of hashed u on the twist.",
            "",
        ]
    return lines + errors + ([""] if errors else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.psi", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="ids per side, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="worker threads per party (default: every core)")
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    parser.add_argument(
        "--alternatives", action="store_true", help="also the one-thread rates of the groups considered (CRYPTO.md)"
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    records = run_psi_bench(sizes, args.threads) if sizes else []
    print("\n".join(table(records)))
    if args.alternatives:
        alternatives = measure_alternatives()
        print(json.dumps(alternatives, indent=1))
        records.append({"name": "psi", "case": "alternatives", "backend": "", **alternatives})
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
