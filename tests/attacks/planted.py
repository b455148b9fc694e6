"""Start a real service with one deliberately planted regression (tests only).

`python -m tests.attacks.planted` reads VFL_PLANT (a name in PLANTS) and
VFL_PLANT_MODULE (the service to run, e.g. `vfl.services.passive`), undoes one
privacy fix by monkeypatching it back to the old, leaky behaviour, then runs
the service exactly as `python -m VFL_PLANT_MODULE` would. Each attack test
runs against the real service and against its planted twin: the attack must
fail on the first and succeed on the second, which shows that the test would
catch the regression. Nothing here is imported by the product.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Callable

PLANTS: dict[str, Callable[[], None]] = {}


def plant(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        PLANTS[name] = fn
        return fn

    return register


def main() -> None:
    name = os.environ.get("VFL_PLANT", "")
    module = os.environ.get("VFL_PLANT_MODULE", "")
    if name not in PLANTS or not module:
        print(f"planted: VFL_PLANT must be one of {sorted(PLANTS)} and VFL_PLANT_MODULE set", file=sys.stderr)
        raise SystemExit(2)
    PLANTS[name]()
    print(f"planted: regression {name!r} planted in {module}", file=sys.stderr, flush=True)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# --- the plants (each undoes one fix; see the attack test that names it) -----


@plant("paillier-square-randomness")
def _paillier_square_randomness() -> None:
    """tests/attacks/test_paillier_randomness.py: the fast Paillier backend's
    old randomness. Hiding encryptions are h_s^r again, r of 256 + 128 + 80
    bits from a fixed-base table, with DJN's h_s = (-x^2)^n, always a square
    modulo a prime factor p = 1 mod 4 of the key holder's n."""
    import secrets

    import gmpy2

    from vfl.common.crypto import fast_backend

    def square_base(n: gmpy2.mpz, n_square: gmpy2.mpz) -> gmpy2.mpz:
        x = fast_backend._random_unit(n)
        return gmpy2.powmod((-(x * x)) % n, n, n_square)

    def short_hiding(self: fast_backend._PaillierPublicOps) -> gmpy2.mpz:
        return self.randomness.table.pow(secrets.randbits(256 + 128 + 80))

    fast_backend.paillier_short_base = square_base
    fast_backend._PaillierPublicOps.hiding_randomiser = short_hiding  # type: ignore[method-assign]


@plant("no-release-noise-passive")
def _no_release_noise_passive() -> None:
    """tests/attacks/test_dp_release.py: B releases z_A without noise (as when
    each party noised only its own gradient, after seeing the exact cross
    term)."""
    import numpy as np

    from vfl.services.passive import party as passive

    def silent(self, job, length):  # type: ignore[no-untyped-def]
        return np.zeros(length)

    passive.PassiveParty._release_noise = silent  # type: ignore[method-assign]


@plant("no-release-noise-active")
def _no_release_noise_active() -> None:
    """tests/attacks/test_dp_release.py: A releases z_B without noise."""
    from vfl.common.protocol import steps

    steps.add_release_noise = lambda key, z, noise: z


@plant("curious-passive-view")
def _curious_passive_view() -> None:
    """Not a regression but the adversary: a curious B that writes down what
    it learns at step 5, its unmasked cross term X_B^T a (plus A's noise),
    to VFL_CURIOUS_LOG, one JSON line per (job, iteration)."""
    import json
    import os

    from vfl.common.protocol import steps
    from vfl.services.passive import party as passive

    log_path = os.environ["VFL_CURIOUS_LOG"]
    original_apply, original_unmask = passive.PassiveParty.apply_gradient, steps.unmask_gradient
    where: dict[str, object] = {}

    def apply_gradient(self, job_id, iteration, target_fp, msg):  # type: ignore[no-untyped-def]
        where.update(job=job_id, iteration=iteration)
        return original_apply(self, job_id, iteration, target_fp, msg)

    def unmask_gradient(*args, **kwargs):  # type: ignore[no-untyped-def]
        h = original_unmask(*args, **kwargs)
        with open(log_path, "a") as fh:
            fh.write(json.dumps({**where, "cross": h.tolist()}) + "\n")
        return h

    passive.PassiveParty.apply_gradient = apply_gradient  # type: ignore[method-assign]
    steps.unmask_gradient = unmask_gradient


@plant("seeded-initial-weights")
def _seeded_initial_weights() -> None:
    """tests/attacks/test_recover_features.py: B's initial weights drawn from
    the job seed (which A chooses), as `reference.initial_weights(seed,
    "passive", ...)` did."""
    import numpy as np

    from vfl.common.protocol import steps
    from vfl.services.passive import party as passive

    current: dict[str, int] = {}
    original = passive.PassiveParty.setup_job

    def setup_job(self, job_id, config, *args, **kwargs):  # type: ignore[no-untyped-def]
        current["seed"] = config.seed
        return original(self, job_id, config, *args, **kwargs)

    def seeded(length: int, scale: float) -> np.ndarray:
        tag = int.from_bytes(b"passive", "big")
        return np.random.default_rng([current["seed"], tag]).normal(0.0, scale, size=length)

    passive.PassiveParty.setup_job = setup_job  # type: ignore[method-assign]
    steps.private_initial_weights = seeded


@plant("assistant-any-target")
def _assistant_any_target() -> None:
    """C tunnels to whatever a CONNECT names, not only to its upstream
    (tests/attacks/test_assistant.py, attack 4)."""
    from vfl.services.assistant import proxy

    proxy.TunnelProxy.route = lambda self, target: proxy.split_target(target)  # type: ignore[method-assign]


# --- B's one-decryption rule (tests/attacks/test_oracle_gaps.py) -------------


@plant("rows-off-schedule")
def _rows_off_schedule() -> None:
    """B takes whatever rows A sends for an iteration (the old behaviour):
    the job's schedule is pinned, for the call, to the rows in the request,
    so that the check against the agreed schedule always passes."""
    from collections.abc import Sequence

    from vfl.common.protocol.batching import Batch
    from vfl.common.serde import rows_array
    from vfl.services.passive import party

    class Pinned(Sequence[Batch]):
        def __init__(self, inner: Sequence[Batch], t: int, rows: object) -> None:
            self.inner, self.t, self.rows = inner, t, rows

        def __len__(self) -> int:
            return len(self.inner)

        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            batch = self.inner[i]
            return Batch(batch.epoch, self.rows) if i == self.t else batch

    original = party.PassiveParty.residual_shares

    def residual_shares(self, job_id, iteration, target_fp, msg):  # type: ignore[no-untyped-def]
        job = self._jobs.get(job_id)
        if job is None or not 0 <= iteration < len(job.expected):
            return original(self, job_id, iteration, target_fp, msg)
        schedule = job.expected
        job.expected = Pinned(schedule, iteration, rows_array(msg.rows, job.x.shape[0], "rows"))
        try:
            return original(self, job_id, iteration, target_fp, msg)
        finally:
            job.expected = schedule

    party.PassiveParty.residual_shares = residual_shares  # type: ignore[method-assign]


@plant("releases-not-persisted")
def _releases_not_persisted() -> None:
    """B's count of decryptions released lives in memory only (the old
    behaviour): nothing is written before z_A leaves B, nor when an
    iteration is restarted, so a crash of B forgets both."""
    from vfl.services.passive import party

    original_restart = party.PassiveParty._restart_iteration

    def restart_iteration(self, job):  # type: ignore[no-untyped-def]
        self._save_state = lambda *args, **kwargs: None  # shadows the method for the call
        try:
            original_restart(self, job)
        finally:
            del self._save_state

    party.PassiveParty._record_release = lambda self, job: None  # type: ignore[method-assign]
    party.PassiveParty._restart_iteration = restart_iteration  # type: ignore[method-assign]


@plant("refusal-keeps-job")
def _refusal_keeps_job() -> None:
    """A refused step leaves the job as it was (the old behaviour): a peer
    may probe again, one answer per query."""
    from contextlib import nullcontext

    from vfl.services.passive import party

    party.PassiveParty._refusal_ends_job = lambda self, job: nullcontext()  # type: ignore[method-assign]


@plant("loss-share-any-iteration")
def _loss_share_any_iteration() -> None:
    """B answers a loss share for any iteration (the old behaviour), not
    only on the job's loss iterations."""
    from vfl.services.passive import party

    party.PassiveJob.loss_iteration = lambda self, iteration: True  # type: ignore[method-assign]


@plant("peer-decryption-any-times")
def _peer_decryption_any_times() -> None:
    """tests/attacks/test_several_parties.py: with other passive parties, B
    decrypts whatever A relays as their masked gradients, as often as asked
    (no one-decryption rule for step 4)."""
    from vfl.common.protocol import sessions, steps

    def decrypt_any(self, t, gradients):  # type: ignore[no-untyped-def]
        self._current(t, "step 4")
        return {
            n: steps.decrypt_masked_gradient(self.backend, self.key, c, self.peers[n].features)
            for n, c in gradients.items()
        }

    sessions.PassiveSession.decrypt_peer_gradients = decrypt_any  # type: ignore[method-assign]


@plant("no-coalition-floor")
def _no_coalition_floor() -> None:
    """tests/attacks/test_several_parties.py: B's batch floor ignores the
    other passive parties (the two-party floor on p_A and its own p_B)."""
    from vfl.services.passive import party

    party.coalition_feature_counts = lambda p_active, p_passives: (p_active, p_passives[0])  # type: ignore[assignment]


@plant("no-training-floors")
def _no_training_floors() -> None:
    """B takes any learning rate and number of iterations, and stores the
    model of a job however early it is finished (the old behaviour): its
    policy's floors set to zero whatever its configuration says."""
    import dataclasses

    from vfl.services.passive import party
    from vfl.services.passive.policy import PassivePolicy

    original = party.PassiveParty.__init__

    def init(self, data, key, backend, data_dir, policy=None, **kwargs):  # type: ignore[no-untyped-def]
        policy = dataclasses.replace(policy or PassivePolicy(), min_learning_rate=0.0, min_iterations=0)
        original(self, data, key, backend, data_dir, policy, **kwargs)

    party.PassiveParty.__init__ = init  # type: ignore[method-assign]


# --- A's range checks (tests/attacks/test_oracle_gaps.py) --------------------

# What the malicious B below returns in place of each score: +-2^300, far
# outside any u_A + u_B (and below an OU key's p, so it decrypts as sent).
CRAFTED_SCORE_BITS = 300


@plant("malicious-passive")
def _malicious_passive() -> None:
    """Not a regression: a malicious B. Its prediction reply is a fresh
    encryption under pk_A of +2^300, -2^300, +2^300, ... (one per id), and
    its loss share an encryption of 2^300: values no valid share gives,
    whose sign after A's decryption mod p_A is what a probing B wants to
    learn."""
    from vfl.common.protocol import steps

    def crafted(key, count):  # type: ignore[no-untyped-def]
        big = 1 << CRAFTED_SCORE_BITS
        return [big if i % 2 == 0 else key.n - big for i in range(count)]

    def target_prediction_data(backend, u_active_enc, u_passive, *model):  # type: ignore[no-untyped-def]
        return backend.encrypt(u_active_enc.key, crafted(u_active_enc.key, len(u_active_enc)), hiding=True)

    def passive_loss_share(backend, a_enc, u_passive, *model):  # type: ignore[no-untyped-def]
        return backend.encrypt(a_enc.key, crafted(a_enc.key, 1), hiding=True)

    steps.target_prediction_data = target_prediction_data
    steps.passive_loss_share = passive_loss_share


@plant("no-active-range-checks")
def _no_active_range_checks() -> None:
    """A uses whatever B's loss share and prediction scores decrypt to (the
    old behaviour): decode and go on, no range check."""

    from vfl.common.crypto.fixedpoint import RESIDUAL_SCALE_BITS, decode, signed
    from vfl.common.protocol import steps
    from vfl.common.protocol.residual import LOGISTIC

    def decrypt_prediction(backend, key, scores, expected_length, model=LOGISTIC):  # type: ignore[no-untyped-def]
        scores.require_key(key.public, "prediction scores")
        scores.require_length(expected_length, "prediction scores")
        u = decode(backend.decrypt(key, scores), RESIDUAL_SCALE_BITS, key.plaintext_modulus)
        return model.link(u)

    def active_loss(u_active, y, share, backend, key, model=LOGISTIC):  # type: ignore[no-untyped-def]
        share.require_key(key.public, "loss share")
        share.require_length(1, "loss share")
        cross = signed(backend.decrypt(key, share), key.plaintext_modulus)[0] / float(1 << steps.LOSS_SCALE_BITS)
        return model.active_loss(u_active, y, cross)

    steps.decrypt_prediction = decrypt_prediction
    steps.active_loss = active_loss


@plant("unblinded-psi-points")
def _unblinded_psi_points() -> None:
    """tests/attacks/test_membership.py: the party sends its ids hashed to
    the group but not raised to its secret scalar, H(x) instead of H(x)^k
    (a PSI with one exponentiation skipped). The peer's dictionary attack
    then reads the party's whole list off the points."""
    from vfl.common import psi
    from vfl.common.protocol import alignment

    def blind_own_ids(secret, ids, shuffle, chunk_points=psi.CHUNK_POINTS):  # type: ignore[no-untyped-def]
        for lo in range(0, len(shuffle), chunk_points):
            yield psi.hash_to_group([ids[i] for i in shuffle.order[lo : lo + chunk_points]])

    alignment.blind_own_ids = blind_own_ids


@plant("poly5-unmasked-cross")
def _poly5_unmasked_cross() -> None:
    """tests/attacks/test_poly5_step0.py: B answers step 0 of the polynomial
    residual with its cross terms unmasked (s = 0), so A reads them."""
    from vfl.common.protocol import steps

    masked = steps.masked_cross_terms

    def unmasked(backend, powers, u_passive, model):  # type: ignore[no-untyped-def]
        out = masked(backend, powers, u_passive, model)
        key = powers.key
        minus = backend.encrypt(key, [(-v) % key.n for v in out.mask])
        return steps.MaskedCross(backend.add(out.ciphers, minus), tuple(0 for _ in out.mask))

    steps.masked_cross_terms = unmasked


@plant("metrics-ids-label")
def _metrics_ids_label() -> None:
    """tests/attacks/test_metrics_scrape.py: a well-meant per-request metric
    labelled with the ids a request names (Predict's, StartAlignment's), so
    whoever reaches the metrics endpoint reads A's customers off it."""
    from prometheus_client import Counter

    from vfl.common import prom, rpc

    requests = Counter("vfl_requests_by_id", "Requests by the ids they name", ["id"], registry=prom.REGISTRY)
    wrap = rpc.MetricsInterceptor.intercept_service

    def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = wrap(self, continuation, details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def unary(request, context):  # type: ignore[no-untyped-def]
            for i in list(getattr(request, "ids", []))[:50]:
                requests.labels(i).inc()
            return inner(request, context)

        return handler._replace(unary_unary=unary)

    rpc.MetricsInterceptor.intercept_service = intercept_service


if __name__ == "__main__":
    main()
