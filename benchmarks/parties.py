"""`make bench BENCH=parties`: one active and k = 1, 2, 3, 4 passive parties
on the synthetic 30,000 x (13 + 10) set, the 10 passive columns split across
the k parties, through the protocol sessions of vfl/common/protocol/sessions.py
in one process (2048-bit OU keys; no gRPC, no network). benchmarks/parties_services.py
runs the same over the real services.

Per iteration and per party: the time spent in that party's own steps, and
the bytes it would send and receive on the wire (ciphertexts and residues at
their serialised widths, batch rows as 4-byte positions). All parties share
this process, so the iteration's wall time is the sum of the parties' times;
in a federation each party's time runs on its own machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import synthetic
from benchmarks.machine import code_version, machine_info
from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import CipherVector, PublicKey
from vfl.common.data import Scaler, load_party_csv
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.batching import batch_schedule, coalition_feature_counts, min_batch_size
from vfl.common.protocol.sessions import (
    ACTIVE,
    ActiveSession,
    GradientReply,
    PartyInfo,
    PassiveSession,
    TrainingPlan,
)
from vfl.common.protocol.steps import with_intercept

CONFIG = JobConfig(batch_size=1024, epochs=1, learning_rate=0.1, l2=0.001, seed=11)
KS = (1, 2, 3, 4)
ROW_BYTES = 4
ROOT = Path(__file__).resolve().parent.parent


def _cipher_bytes(c: CipherVector) -> int:
    return len(c) * c.key.cipher_width


@dataclass
class Counter:
    sent: int = 0  # by the passive party, to A
    received: int = 0
    seconds: float = 0.0


@dataclass
class CountingPort:
    """B_j's session behind what a wire would carry, with the time spent in it."""

    session: PassiveSession
    keys: Mapping[str, PublicKey]
    count: Counter = field(default_factory=Counter)

    def _timed(self, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.count.seconds += time.perf_counter() - start

    def exchange_residual_shares(self, t: int, rows: Sequence[int], a_enc: CipherVector) -> CipherVector:
        self.count.received += len(rows) * ROW_BYTES + _cipher_bytes(a_enc)
        out: CipherVector = self._timed(self.session.exchange_residual_shares, t, rows, a_enc)
        self.count.sent += _cipher_bytes(out)
        return out

    def exchange_masked_gradients(
        self, t: int, active_gradient: CipherVector, peer_shares: Mapping[str, CipherVector]
    ) -> GradientReply:
        self.count.received += _cipher_bytes(active_gradient) + sum(_cipher_bytes(c) for c in peer_shares.values())
        out: GradientReply = self._timed(self.session.exchange_masked_gradients, t, active_gradient, peer_shares)
        me = self.session.key.public
        self.count.sent += len(out.z_active) * me.residue_width + sum(_cipher_bytes(c) for c in out.gradients.values())
        return out

    def decrypt_peer_gradients(self, t: int, gradients: Mapping[str, CipherVector]) -> Mapping[str, list[int]]:
        self.count.received += sum(_cipher_bytes(c) for c in gradients.values())
        out: Mapping[str, list[int]] = self._timed(self.session.decrypt_peer_gradients, t, gradients)
        self.count.sent += sum(len(z) for z in out.values()) * self.session.key.public.residue_width
        return out

    def apply_gradient(self, t: int, decryptions: Mapping[str, list[int]]) -> None:
        self.count.received += sum(len(z) * self.keys[q].residue_width for q, z in decryptions.items())
        self._timed(self.session.apply_gradient, t, decryptions)

    # The loss check is not part of this benchmark.
    def loss_cross_terms(self, t: int) -> Mapping[str, CipherVector]:
        return self.session.loss_cross_terms(t)

    def decrypt_loss_terms(self, t: int, terms: Mapping[str, CipherVector]) -> None:
        self.session.decrypt_loss_terms(t, terms)

    def loss_share(self, t: int) -> CipherVector:
        return self.session.loss_share(t)


def run_k(k: int, xa: np.ndarray, y: np.ndarray, xb: np.ndarray, bits: int, iterations: int) -> dict[str, Any]:
    backend = get_backend("ou")
    keys = [backend.generate_keypair(bits) for _ in range(k + 1)]
    groups = np.array_split(np.arange(xb.shape[1]), k)
    names = [f"b{j + 1}" for j in range(k)]
    infos = [PartyInfo(n, keys[j + 1].public, len(groups[j])) for j, n in enumerate(names)]
    active_info = PartyInfo(ACTIVE, keys[0].public, xa.shape[1] - 1)
    plan = TrainingPlan.of(CONFIG)
    rng = np.random.default_rng(k)
    by_name = {ACTIVE: keys[0].public, **{i.name: i.key for i in infos}}
    ports = {
        n: CountingPort(
            PassiveSession(
                n,
                backend,
                keys[j + 1],
                xb[:, groups[j]],
                rng.normal(0, 0.01, len(groups[j])),
                plan,
                active_info,
                [p for p in infos if p.name != n],
            ),
            by_name,
        )
        for j, n in enumerate(names)
    }
    w0 = np.asarray(rng.normal(0, 0.01, xa.shape[1]))
    active = ActiveSession(backend, keys[0], xa, y, w0, plan, infos, ports)
    pa, pb = coalition_feature_counts(xa.shape[1] - 1, [len(g) for g in groups])
    floor = min_batch_size(pa, pb, False)
    batches = batch_schedule(len(y), CONFIG.batch_size, 1, CONFIG.seed, floor, iterations + 1)
    walls, a_secs = [], []
    for t, batch in enumerate(batches):
        before = {n: (p.count.seconds, p.count.sent, p.count.received) for n, p in ports.items()}
        start = time.perf_counter()
        active.iteration(t, batch.rows.tolist())
        wall = time.perf_counter() - start
        if t == 0:
            # The first iteration grows each key's fixed-base tables: not counted.
            for p in ports.values():
                p.count = Counter()
            continue
        walls.append(wall)
        a_secs.append(wall - sum(p.count.seconds - before[n][0] for n, p in ports.items()))
    n = len(walls)
    per_b = {
        name: {
            "features": len(groups[j]),
            "s_per_iteration": round(ports[name].count.seconds / n, 4),
            "sent_bytes_per_iteration": ports[name].count.sent // n,
            "received_bytes_per_iteration": ports[name].count.received // n,
        }
        for j, name in enumerate(names)
    }
    return {
        "name": "parties",
        "case": f"k={k}",
        "k": k,
        "iterations": n,
        "batch_size": CONFIG.batch_size,
        "key_bits": bits,
        "wall_s_per_iteration": round(statistics.median(walls), 4),
        "active_s_per_iteration": round(statistics.median(a_secs), 4),
        # A's traffic is the sum of its links: what each B_j receives is what A sends it.
        "active_sent_bytes_per_iteration": sum(b["received_bytes_per_iteration"] for b in per_b.values()),
        "active_received_bytes_per_iteration": sum(b["sent_bytes_per_iteration"] for b in per_b.values()),
        "passive": per_b,
    }


def workload(quick: bool) -> list[dict[str, Any]]:
    rows = 3_000 if quick else synthetic.DEFAULT_ROWS
    bits = 1024 if quick else 2048
    iterations = 2 if quick else 4
    with tempfile.TemporaryDirectory() as tmp:
        split = synthetic.make_default(Path(tmp), rows=rows)
        active = load_party_csv(split.active_csv, "id", "y")
        passive = load_party_csv(split.passive_csv, "id", None)
    ids = list(active.ids)
    xa = with_intercept(Scaler.fit(active.features).transform(active.features))
    xb_raw = passive.features[passive.positions(ids, "ids")]
    xb = Scaler.fit(xb_raw).transform(xb_raw)
    assert active.labels is not None
    out = []
    for k in KS:
        rec = run_k(k, xa, active.labels, xb, bits, iterations)
        rec.update({"machine": machine_info(), "commit": code_version(ROOT)["commit"], "rows": rows})
        out.append(rec)
        print(f"parties k={k}: {rec['wall_s_per_iteration']:.3f} s/iteration", flush=True)
    return out


def report_section(records: Sequence[dict[str, Any]]) -> list[str]:
    runs = sorted((r for r in records if r.get("name") == "parties" and "error" not in r), key=lambda r: r["k"])
    lines = ["## Several passive parties (protocol sessions, in-process)", ""]
    if not runs:
        return lines + ["Not run yet.", ""]
    first = runs[0]
    lines += [
        f"`make bench BENCH=parties` (`benchmarks/parties.py`): the synthetic {first['rows']:,} x (13 + 10) set, "
        f"the 10 passive columns split across k passive parties, batch {first['batch_size']}, "
        f"{first['key_bits']}-bit OU keys, median of {first['iterations']} iterations after a warm-up one; "
        "every party in one process through `vfl/common/protocol/sessions.py` (no gRPC or network, so the "
        "wall time is the sum of all parties' times; in a federation each runs on its own cores). "
        f"Commit {first['commit']}.",
        "",
        "| k | wall s / iteration (all parties) | A s / it. | each B_j s / it. | A sends / receives KiB / it. "
        "| each B_j sends / receives KiB / it. |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        bs = r["passive"].values()
        b_s = ", ".join(f"{b['s_per_iteration']:.3f}" for b in bs)
        b_kb = ", ".join(
            f"{b['sent_bytes_per_iteration'] / 1024:.0f} / {b['received_bytes_per_iteration'] / 1024:.0f}" for b in bs
        )
        lines.append(
            f"| {r['k']} | {r['wall_s_per_iteration']:.3f} | {r['active_s_per_iteration']:.3f} | {b_s} | "
            f"{r['active_sent_bytes_per_iteration'] / 1024:.0f} / {r['active_received_bytes_per_iteration'] / 1024:.0f}"
            f" | {b_kb} |"
        )
    lines += [
        "",
        "Why it grows so. Per iteration of m rows, A encrypts [[a]] once and computes one product X_A^T [[b_j]] "
        "under each B_j's key (k products of (p_A + 1) x m) and decrypts k masked gradients; each B_j encrypts "
        "[[b_j]] once, computes k products X_j^T [[s_Q]] (one under A's key, one under each other B_l's) and "
        "decrypts p_A + 1 + sum_{l != j} p_l values. The products are the cost: their total is "
        "sum_P k p_P m = k (p_A + 1 + p_B) m ciphertext-by-feature terms, linear in k for a fixed column set "
        "(each B_j's share of it shrinks as p_j = p_B / k, but it works under k keys). Bytes: A relays each "
        "[[b_l]] (m ciphertexts) to the k - 1 other passive parties and each B_j's k - 1 masked gradients to "
        "their key owners, so A's traffic grows as k (k - 1) m ciphertexts: quadratic in k, and dominated by "
        "the relayed shares once k > 1; each B_j's grows linearly (k m ciphertexts in).",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parties", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    for line in report_section(workload(args.quick)):
        print(line)


if __name__ == "__main__":
    main()
