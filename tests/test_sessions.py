"""The protocol sessions of vfl/common/protocol/sessions.py run against each
other in one process, with real OU keys and no network: one active party and
k = 1, 2, 3 passive parties (the breast split's passive columns divided among
them). The federated weights equal the plain-numpy run on the joined table,
for logistic and linear regression and every optimiser; the step order and
the one-decryption rule hold at every passive party; and a coalition of A and
B_l sees B_j's masked gradient under pk_l hidden by B_j's mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest

from tests.conftest import TEST_KEY_BITS
from tests.reference_run import assert_weights_close
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE, split_ids
from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import CipherVector, PrivateKey
from vfl.common.crypto.fixedpoint import RESIDUAL_SCALE_BITS
from vfl.common.data import Scaler, load_party_csv
from vfl.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol import steps
from vfl.common.protocol.batching import Batch, batch_schedule, coalition_feature_counts, min_batch_size
from vfl.common.protocol.reference import train_plain, with_intercept
from vfl.common.protocol.sessions import (
    ACTIVE,
    ActiveSession,
    GradientReply,
    PartyInfo,
    PassiveSession,
    TrainingPlan,
    passive_scores,
)

BACKEND = get_backend("ou")


@cache
def keys(count: int) -> tuple[PrivateKey, ...]:
    return tuple(BACKEND.generate_keypair(TEST_KEY_BITS) for _ in range(count))


@cache
def breast() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A's standardised training rows (with the intercept), the labels, and
    the passive columns (standardised), rows aligned by id."""
    active, passive = load_party_csv(BUNDLED_ACTIVE, "id", "y"), load_party_csv(BUNDLED_PASSIVE, "id", None)
    train, _, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    xa = active.features[active.positions(train, "train")]
    xb = passive.features[passive.positions(train, "train")]
    assert active.labels is not None
    y = active.labels[active.positions(train, "train")]
    return with_intercept(Scaler.fit(xa).transform(xa)), y, Scaler.fit(xb).transform(xb)


@dataclass
class Federation:
    active: ActiveSession
    passive: dict[str, PassiveSession]
    column_groups: list[np.ndarray]
    w0_active: np.ndarray
    w0_passive: list[np.ndarray]


def federation(k: int, config: JobConfig, ports: Mapping[str, object] | None = None) -> Federation:
    xa, y, xb = breast()
    groups = np.array_split(np.arange(xb.shape[1]), k)
    all_keys = keys(k + 1)
    rng = np.random.default_rng(k)
    plan = TrainingPlan.of(config)
    names = [f"b{j + 1}" for j in range(k)]
    infos = [PartyInfo(n, all_keys[j + 1].public, len(groups[j])) for j, n in enumerate(names)]
    active_info = PartyInfo(ACTIVE, all_keys[0].public, xa.shape[1] - 1)
    w0_a = rng.normal(0, 0.01, xa.shape[1])
    w0_b = [rng.normal(0, 0.01, len(g)) for g in groups]
    passive = {
        n: PassiveSession(
            n, BACKEND, all_keys[j + 1], xb[:, groups[j]], w0_b[j], plan, active_info, [p for p in infos if p.name != n]
        )
        for j, n in enumerate(names)
    }
    active = ActiveSession(BACKEND, all_keys[0], xa, y, w0_a, plan, infos, dict(ports or passive))  # type: ignore[arg-type]
    return Federation(active, passive, groups, w0_a, w0_b)


def schedule(k: int, config: JobConfig, fed: Federation) -> list[np.ndarray]:
    xa, y, _ = breast()
    pa, pb = coalition_feature_counts(xa.shape[1] - 1, [len(g) for g in fed.column_groups])
    floor = min_batch_size(pa, pb, config.allow_small_batch)
    batches = batch_schedule(len(y), config.batch_size, config.epochs, config.seed, floor, config.max_iterations)
    return [b.rows for b in batches]


def train(k: int, config: JobConfig) -> tuple[Federation, list[np.ndarray]]:
    fed = federation(k, config)
    rows = schedule(k, config, fed)
    for t, r in enumerate(rows):
        fed.active.iteration(t, r.tolist())
    return fed, rows


def plain(fed: Federation, config: JobConfig, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The same algorithm on the joined table [X_A, X_B1, ..., X_Bk]."""
    xa, y, xb = breast()
    joined = np.hstack([xb[:, g] for g in fed.column_groups])
    batches = [Batch(0, r) for r in schedule(k, config, fed)]
    wa, wb = train_plain(
        xa[:, :-1],
        joined,
        y,
        fed.w0_active,
        np.concatenate(fed.w0_passive),
        batches,
        TrainingPlan.of(config).optimizer,
        config.l2,
        model=config.residual_model,
    )
    return wa, np.split(wb, np.cumsum([len(g) for g in fed.column_groups])[:-1])


def assert_matches_plain(fed: Federation, config: JobConfig, k: int) -> None:
    wa, wbs = plain(fed, config, k)
    assert_weights_close(fed.active.w, wa)
    for j, name in enumerate(sorted(fed.passive)):
        assert_weights_close(fed.passive[name].w, wbs[j])
    # And it learned: weights moved well beyond their start.
    assert np.linalg.norm(fed.active.w - fed.w0_active) > 0.1


BASE = JobConfig(epochs=2, batch_size=64, learning_rate=0.2, l2=0.01, seed=5)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("model", ["logistic", "linear"])
def test_k_passive_parties_match_plain_numpy(k: int, model: str) -> None:
    config = BASE.model_copy(update={"model": model, "learning_rate": 0.2 if model == "logistic" else 0.05})
    fed, _ = train(k, config)
    assert_matches_plain(fed, config, k)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
def test_every_optimiser_with_two_passive_parties(optimizer: str) -> None:
    config = BASE.model_copy(
        update={"optimizer": optimizer, "learning_rate": 0.05, "lr_decay": "inverse_time", "decay_rate": 0.1}
    )
    fed, _ = train(2, config)
    assert_matches_plain(fed, config, 2)


def test_three_parties_predict_the_plain_scores() -> None:
    config = BASE
    fed, _ = train(3, config)
    xa, _, xb = breast()
    rows = np.arange(40)

    class Port:
        def __init__(self, session: PassiveSession, cols: np.ndarray) -> None:
            self.s, self.cols = session, cols

        def predict_scores(self, enc: CipherVector) -> CipherVector:
            return passive_scores(BACKEND, xb[rows][:, self.cols], self.s.w, enc)

    ports = {n: Port(fed.passive[n], fed.column_groups[j]) for j, n in enumerate(sorted(fed.passive))}
    probs = fed.active.scores(xa[rows], fed.active.w, ports)
    u = xa[rows] @ fed.active.w + sum(
        xb[rows][:, fed.column_groups[j]] @ fed.passive[n].w for j, n in enumerate(sorted(fed.passive))
    )
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-u)), atol=1e-6)


# --- the rules at each passive party ----------------------------------------


def started(k: int = 2) -> tuple[Federation, list[np.ndarray]]:
    fed = federation(k, BASE)
    return fed, schedule(k, BASE, fed)


def test_passive_party_refuses_steps_out_of_order_and_second_decryptions() -> None:
    fed, rows = started()
    b1, b2 = fed.passive["b1"], fed.passive["b2"]
    xa, y, _ = breast()
    r = rows[0]
    a = steps.active_residual_share(xa[r], fed.active.w, y[r])
    a_enc = steps.first_encrypted_data(BACKEND, keys(3)[0].public, a)
    with pytest.raises(FailedPrecondition, match="step 3"):
        b1.exchange_masked_gradients(0, a_enc, {})
    s1 = b1.exchange_residual_shares(0, r.tolist(), a_enc)
    assert b1.exchange_residual_shares(0, r.tolist(), a_enc) is s1  # a retry: replayed
    a_other = steps.first_encrypted_data(BACKEND, keys(3)[0].public, a + 1.0)
    with pytest.raises(FailedPrecondition, match="second, different"):
        b1.exchange_residual_shares(0, r.tolist(), a_other)
    s2 = b2.exchange_residual_shares(0, r.tolist(), a_enc)
    mine = steps.masked_encrypted_gradient(BACKEND, xa[r], s1)
    with pytest.raises(InvalidArgument, match="peer_shares"):
        b1.exchange_masked_gradients(0, mine.ciphers, {})  # b2's share missing
    with pytest.raises(Exception, match="under key"):
        b1.exchange_masked_gradients(0, mine.ciphers, {"b2": s1})  # b1's own share passed off as b2's
    reply = b1.exchange_masked_gradients(0, mine.ciphers, {"b2": s2})
    assert b1.exchange_masked_gradients(0, mine.ciphers, {"b2": s2}) is reply
    other = steps.masked_encrypted_gradient(BACKEND, xa[r], s1)  # a fresh mask: a different vector
    with pytest.raises(FailedPrecondition, match="second, different masked gradient"):
        b1.exchange_masked_gradients(0, other.ciphers, {"b2": s2})
    with pytest.raises(FailedPrecondition, match="step 5 before"):
        b1.apply_gradient(0, {ACTIVE: [0], "b2": [0]})
    # Step 4 at b1 for b2's gradient under pk_1: once.
    b2_reply = b2.exchange_masked_gradients(0, steps.masked_encrypted_gradient(BACKEND, xa[r], s2).ciphers, {"b1": s1})
    z = b1.decrypt_peer_gradients(0, {"b2": b2_reply.gradients["b1"]})
    assert b1.decrypt_peer_gradients(0, {"b2": b2_reply.gradients["b1"]}) == z
    with pytest.raises(FailedPrecondition, match="second, different set"):
        b1.decrypt_peer_gradients(0, {"b2": reply.gradients[ACTIVE]})


def test_active_refuses_a_gradient_under_the_wrong_owner_key() -> None:
    """A relays B_j's masked gradients by the owner of their key: one that
    claims to be under pk_l but is not is refused before anyone decrypts it."""
    fed, rows = started()

    class Swapping:
        def __init__(self, inner: PassiveSession) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def exchange_masked_gradients(
            self, t: int, g: CipherVector, shares: Mapping[str, CipherVector]
        ) -> GradientReply:
            reply = self.inner.exchange_masked_gradients(t, g, shares)
            swapped = dict(reply.gradients)
            swapped["b2"], swapped[ACTIVE] = swapped[ACTIVE], swapped["b2"]
            return GradientReply(reply.z_active, swapped)

    fed2 = federation(2, BASE, ports={"b1": Swapping(fed.passive["b1"]), "b2": fed.passive["b2"]})
    with pytest.raises(Exception, match="under key"):
        fed2.active.iteration(0, rows[0].tolist())


# --- what a coalition of A and B_l sees of B_j --------------------------------


def test_a_and_b2_together_see_b1s_cross_gradient_only_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A colludes with B_2 (it holds sk_2): the masked gradient of B_1 under
    pk_2 that A relays decrypts to X_1^T b_2 + R_12, and R_12 (B_1's own fresh
    mask, never sent) hides it: the difference from the true value is a
    number of about HIDDEN_VALUE_BITS + 80 bits. Planting a zero mask makes
    the coalition read X_1^T b_2 exactly (the test fails)."""
    seen: list[tuple[np.ndarray, CipherVector]] = []
    fed, rows = started()
    b1 = fed.passive["b1"]
    original = b1.exchange_masked_gradients

    def spy(t: int, g: CipherVector, shares: Mapping[str, CipherVector]) -> GradientReply:
        reply = original(t, g, shares)
        seen.append((b1.x[rows[t]], reply.gradients["b2"]))
        return reply

    monkeypatch.setattr(b1, "exchange_masked_gradients", spy)
    _train_some(fed, rows, 2)
    sk2 = keys(3)[2]
    for t, (x1, c) in enumerate(seen):
        z = BACKEND.decrypt(sk2, c)
        # The coalition knows b_2 of the batch (B_2's own share, from its weights before step 5).
        b2 = _b2_history[t]
        truth = steps.fixed_transpose(x1).astype(object) @ np.array(
            [int(round(v * 2**RESIDUAL_SCALE_BITS)) for v in b2], dtype=object
        )
        p = sk2.plaintext_modulus
        gap = [(int(zv) - int(tv)) % p for zv, tv in zip(z, truth, strict=True)]
        assert min(gap).bit_length() > steps.HIDDEN_VALUE_BITS - 8, "B_1's masked gradient is readable by A + B_2"


_b2_history: list[np.ndarray] = []


def _train_some(fed: Federation, rows: Sequence[np.ndarray], n: int) -> None:
    _b2_history.clear()
    b2 = fed.passive["b2"]
    for t in range(n):
        _b2_history.append(steps.passive_residual_share(b2.x[rows[t]], b2.w))
        fed.active.iteration(t, rows[t].tolist())


# --- the loss check with k passive parties ------------------------------------


def plain_loss(
    fed: Federation, rows: np.ndarray, w_active: np.ndarray, w_passive: list[np.ndarray], model: str
) -> float:
    xa, y, xb = breast()
    u = xa[rows] @ w_active + sum(xb[rows][:, g] @ w for g, w in zip(fed.column_groups, w_passive, strict=True))
    if model == "linear":
        return float(np.mean((u - y[rows]) ** 2) / 2)
    y_pm = 2 * y[rows] - 1
    return float(np.log(2) + np.mean(-y_pm * u / 2 + u**2 / 8))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("model", ["logistic", "linear"])
def test_loss_check_equals_the_plain_loss(k: int, model: str) -> None:
    config = BASE.model_copy(update={"model": model, "learning_rate": 0.05})
    fed = federation(k, config)
    rows = schedule(k, config, fed)
    names = sorted(fed.passive)
    for t in range(3):
        w_a, w_b = fed.active.w.copy(), [fed.passive[n].w.copy() for n in names]
        loss = fed.active.iteration(t, rows[t].tolist(), check_loss=True)
        assert loss == pytest.approx(plain_loss(fed, rows[t], w_a, w_b, model), abs=1e-9)
    assert fed.active.iteration(3, rows[3].tolist()) is None


def test_loss_terms_are_decrypted_once_and_masked() -> None:
    """B_2 decrypts B_1's cross term once per iteration; what it reads is the
    cross term plus B_1's mask, about pair_loss_bits + 80 bits away from the
    true value (planting a zero mask in steps.pair_loss_term fails this)."""
    fed, rows = started()
    b1, b2 = fed.passive["b1"], fed.passive["b2"]
    seen: list[int] = []
    original = steps.decrypt_pair_loss_term

    def spy(backend: object, key: PrivateKey, term: CipherVector, m: int) -> int:
        s = original(backend, key, term, m)  # type: ignore[arg-type]
        seen.append(s)
        return s

    b2_share = steps.passive_residual_share(b2.x[rows[0]], b2.w)
    u1 = b1.x[rows[0]] @ b1.w
    import unittest.mock as mock

    with mock.patch.object(steps, "decrypt_pair_loss_term", spy):
        fed.active.iteration(0, rows[0].tolist(), check_loss=True)
    truth = float(u1 @ b2_share) * 2.0**steps.LOSS_SCALE_BITS
    assert len(seen) == 1
    assert abs(seen[0] - truth) > 2.0 ** (steps.pair_loss_bits(len(rows[0])) - 1), "B_2 reads B_1's cross term"


def test_a_second_different_set_of_loss_terms_is_refused() -> None:
    fed, rows = started()
    b2 = fed.passive["b2"]
    refusals: list[Exception] = []
    real = b2.decrypt_loss_terms

    def twice(t: int, terms: Mapping[str, CipherVector]) -> None:
        real(t, terms)
        real(t, terms)  # the same again: replayed, nothing decrypted twice
        other = BACKEND.encrypt(keys(3)[2].public, [1], hiding=True)
        try:
            real(t, {"b1": other})
        except FailedPrecondition as exc:
            refusals.append(exc)

    b2.decrypt_loss_terms = twice  # type: ignore[method-assign]
    fed.active.iteration(0, rows[0].tolist(), check_loss=True)
    assert len(refusals) == 1 and "second, different set of loss terms" in str(refusals[0])


def test_the_loss_check_is_refused_with_the_polynomial_residual() -> None:
    from vfl.common.protocol.residual import POLY5

    plan = TrainingPlan.of(BASE, POLY5)
    with pytest.raises(FailedPrecondition, match="polynomial residual"):
        _ = plan.loss_model
    assert TrainingPlan.of(BASE).loss_model is BASE.residual_model


class Flaky:
    """A port that loses the connection once per (method, iteration) in
    `faults`: "before" the party sees the call, or "after" it answered (the
    answer is lost). Counts the calls that reached the party."""

    def __init__(self, port: PassiveSession, faults: set[tuple[str, int, str]]) -> None:
        self.port, self.faults, self.delivered = port, set(faults), 0

    def __getattr__(self, method: str) -> object:
        target = getattr(self.port, method)

        def call(t: int, *args: object) -> object:
            if (method, t, "before") in self.faults:
                self.faults.discard((method, t, "before"))
                raise Unavailable(f"{method}: connection lost before the call")
            out = target(t, *args)
            self.delivered += 1
            if (method, t, "after") in self.faults:
                self.faults.discard((method, t, "after"))
                raise Unavailable(f"{method}: connection lost after the answer")
            return out

        return call


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_lost_connection_mid_iteration_is_retried_to_the_plain_model(when: str) -> None:
    """Every step of some iteration loses its connection once; A repeats the
    iteration: the same requests again, answered by replay (a second,
    different request would be refused and end the job), and the model is
    the uninterrupted one."""
    config = BASE.model_copy(update={"max_iterations": 8, "loss_every": 2})
    fed = federation(2, config)
    methods = ["exchange_residual_shares", "exchange_masked_gradients", "decrypt_peer_gradients", "apply_gradient"]
    methods += ["loss_cross_terms", "decrypt_loss_terms", "loss_share"]
    faults = {"b1": {(m, 1, when) for m in methods}, "b2": {(m, 3, when) for m in methods[:4]}}
    fed.active.ports = {n: Flaky(fed.passive[n], faults[n]) for n in fed.passive}  # type: ignore[misc]
    rows = schedule(2, config, fed)
    retries = 0
    for t, r in enumerate(rows):
        while True:
            try:
                fed.active.iteration(t, r.tolist(), check_loss=t % 2 == 1)
                break
            except Unavailable:
                retries += 1
    assert retries == len(methods) + 4
    assert all(not p.faults for p in fed.active.ports.values())  # type: ignore[attr-defined]
    wa, wbs = plain(fed, config, 2)
    assert_weights_close(fed.active.w, wa)
    for j, name in enumerate(sorted(fed.passive)):
        assert_weights_close(fed.passive[name].w, wbs[j])
