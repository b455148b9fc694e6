"""Attacks on B's one-decryption rule and on A's range checks (issue "[1/6]
Private in fact", items 5 and 6).

B decrypts for A once per step: one vector of p_A + 1 ciphertexts, for the
rows of the agreed schedule, once per iteration (twice if the iteration is
restarted), counted on disk before it leaves B; any refusal ends the job; the
loss share only on loss iterations; B's own floors on batch size, learning
rate and iterations. A range-checks what it decrypts for B (scores, loss
share): with OU a crafted value's sign after decryption mod A's secret p is
an oracle on p.

The adversary in attacks 1-6 is A, played by the test over real gRPC against
a real B process (OU, 1024-bit test keys, B's default policy unless a test
says otherwise; tests/attacks/harness.py). Attack 7's adversary is B, run by
a plant (tests/attacks/planted.py, "malicious-passive") in a real federation.
Every attack runs twice: against the real service, where it must be refused
or recover nothing, and against the service under a planted regression that
undoes the one fix, where it must succeed. That shows the test would catch
the regression.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.attacks.harness import MaliciousActive, attack_federation, refused
from tests.attacks.planted import CRAFTED_SCORE_BITS
from tests.conftest import BreastSplit, make_federation
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.common.crypto.backend import PrivateKey, get_backend
from vfl.common.errors import PeerError
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.batching import min_batch_size
from vfl.common.protocol.phases import Phase
from vfl.common.rpc import status_of
from vfl.v1 import client_pb2

BACKEND = get_backend("ou")
# 455 training rows in batches of 64: 7 per epoch, 12 iterations (B's floor is 10).
CONFIG = JobConfig(batch_size=64, epochs=2, seed=20261202, loss_every=0, max_iterations=12)
P_A, P_B = 10, 20  # the bundled breast split
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    """A's own OU key pair."""
    return BACKEND.generate_keypair(1024)


@contextmanager
def passive(workdir: Path, plant: str | None = None, **env: str) -> Iterator[LocalFederation]:
    """B alone, as its own process (with one planted regression if asked)."""
    fed = attack_federation(workdir, {"passive": plant} if plant else None, **env)
    try:
        fed.start("passive")
        yield fed
    finally:
        fed.stop()


@pytest.fixture(scope="module")
def real_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """The real B, default policy, shared by the attacks that do not restart it."""
    with passive(tmp_path_factory.mktemp("real-b")) as fed:
        yield fed


@contextmanager
def attacker(fed: LocalFederation, key: PrivateKey, breast: BreastSplit) -> Iterator[MaliciousActive]:
    a = MaliciousActive(fed.services["passive"].address, key, BACKEND, breast.train_ids)
    a.exchange_keys()
    try:
        yield a
    finally:
        if a.job_id:
            try:
                a.finish(0, aborted=True)  # the job must not count against B's model budget
            except PeerError:
                pass  # already ended by B
        a.close()


def assert_job_ended(a: MaliciousActive) -> None:
    """B forgot the job: any further call about it is NOT_FOUND."""
    err = refused(a.job_state)
    assert status_of(err) == Code.NOT_FOUND, err
    err = refused(a.shares, 0)
    assert status_of(err) == Code.NOT_FOUND, err


# --- 1. A restarts an iteration with other rows ------------------------------


def restart_with_other_rows(a: MaliciousActive) -> tuple[int, PeerError | None]:
    """Steps 1-4 of iteration 0 (one decryption), then step 1 of iteration 0
    again with other rows than the schedule's, to have another batch
    decrypted. Returns the decryptions of iteration 0 and B's refusal."""
    a.setup(CONFIG)
    a.gradients(0, a.shares(0))
    rng = np.random.default_rng(3)
    others = np.sort(rng.choice(np.setdiff1d(np.arange(len(a.ids)), a.rows(0)), size=CONFIG.batch_size, replace=False))
    try:
        step4 = a.gradients(0, a.shares(0, others), others)
    except PeerError as exc:
        return 1, exc
    assert len(step4.z_a) == P_A + 1
    return 2, None


def test_restart_with_other_rows_is_refused_and_ends_the_job(
    real_b: LocalFederation, key: PrivateKey, breast: BreastSplit
) -> None:
    with attacker(real_b, key, breast) as a:
        decryptions, err = restart_with_other_rows(a)
        assert decryptions == 1
        assert err is not None and status_of(err) == Code.INVALID_ARGUMENT, err
        assert "rows: not the rows of iteration 0" in str(err)
        assert_job_ended(a)


def test_planted_rows_off_schedule_is_caught(tmp_path: Path, key: PrivateKey, breast: BreastSplit) -> None:
    """PLANTED REGRESSION "rows-off-schedule": B takes any rows; A gets a
    decryption of a batch outside the schedule."""
    with passive(tmp_path, "rows-off-schedule") as fed, attacker(fed, key, breast) as a:
        decryptions, err = restart_with_other_rows(a)
        assert err is None and decryptions == 2


# --- 2. A crash of B gives A another decryption ------------------------------


def decryptions_across_crashes(fed: LocalFederation, a: MaliciousActive, crashes: int = 2) -> tuple[int, list]:
    """z_A of iteration 0, then `crashes` times: SIGKILL B, restart it on the
    same port and data directory, and send iteration 0 again with fresh
    ciphertexts. Returns how many z_A of iteration 0 A obtained, and B's refusals."""
    a.setup(CONFIG)
    a.gradients(0, a.shares(0))
    count, refusals = 1, []
    for _ in range(crashes):
        fed.services["passive"].stop(signal.SIGKILL)
        fed.start("passive")
        a.reconnect(fed.services["passive"].address)
        try:
            a.gradients(0, a.shares(0))
            count += 1
        except PeerError as exc:
            refusals.append(exc)
    return count, refusals


def test_crashes_of_b_give_at_most_two_decryptions(tmp_path: Path, key: PrivateKey, breast: BreastSplit) -> None:
    with passive(tmp_path) as fed, attacker(fed, key, breast) as a:
        count, refusals = decryptions_across_crashes(fed, a)
        # The first crash: a restart of the iteration (allowed once, on disk);
        # the second: refused, the restart is on disk too.
        assert count == 2
        assert [status_of(e) for e in refusals] == [Code.FAILED_PRECONDITION]
        assert "was already started" in str(refusals[0])
        assert_job_ended(a)


def test_planted_releases_not_persisted_is_caught(tmp_path: Path, key: PrivateKey, breast: BreastSplit) -> None:
    """PLANTED REGRESSION "releases-not-persisted": B counts releases and
    restarts in memory only; every crash gives A one more decryption."""
    with passive(tmp_path, "releases-not-persisted") as fed, attacker(fed, key, breast) as a:
        count, refusals = decryptions_across_crashes(fed, a)
        assert count == 3 and not refusals


# --- 3. A refused decryption leaves the step open ------------------------------


def probe_decryptions(a: MaliciousActive) -> tuple[PeerError, PeerError | list[int]]:
    """At step 3 of iteration 0, crafted vectors under pk_B in place of A's
    masked gradient: first Enc(-1) (decrypts to p_B - 1 under OU), then
    Enc(2^250) (>= 2^210, above any masked value). Each answer is one bit
    about p_B (in range or not). Returns both answers."""
    assert a.passive_key is not None
    a.setup(CONFIG)
    b_enc = a.shares(0)
    n, k = a.passive_key.n, P_A + 1
    first = refused(a.gradients, 0, b_enc, crafted=BACKEND.encrypt(a.passive_key, [n - 1] * k))
    try:
        return first, a.gradients(0, b_enc, crafted=BACKEND.encrypt(a.passive_key, [1 << 250] * k)).z_a
    except PeerError as exc:
        return first, exc


def test_an_out_of_range_decryption_ends_the_job(real_b: LocalFederation, key: PrivateKey, breast: BreastSplit) -> None:
    with attacker(real_b, key, breast) as a:
        first, second = probe_decryptions(a)
        assert status_of(first) == Code.OUT_OF_RANGE and "masked gradient" in str(first)
        # One bit per job: the second probe finds no job.
        assert isinstance(second, PeerError) and status_of(second) == Code.NOT_FOUND, second
        assert_job_ended(a)


def test_planted_refusal_keeps_job_is_caught(tmp_path: Path, key: PrivateKey, breast: BreastSplit) -> None:
    """PLANTED REGRESSION "refusal-keeps-job": the step stays open after a
    refusal; A may probe again and again, and a probe in range is answered."""
    with passive(tmp_path, "refusal-keeps-job") as fed, attacker(fed, key, breast) as a:
        assert a.passive_key is not None
        first, second = probe_decryptions(a)
        assert status_of(first) == Code.OUT_OF_RANGE
        assert isinstance(second, PeerError) and status_of(second) == Code.OUT_OF_RANGE, second
        crafted = BACKEND.encrypt(a.passive_key, [5] * (P_A + 1))
        assert a.gradients(0, None, crafted=crafted).z_a == [5] * (P_A + 1)


# --- 4. A loss share on an iteration that is no loss check --------------------


def loss_share_off_schedule(a: MaliciousActive) -> object:
    """loss_every=5: after steps 1-2 of iteration 0, ask for iteration 0's
    loss share (one more scalar about u_B). Returns the share or B's refusal."""
    a.setup(CONFIG.model_copy(update={"loss_every": 5}))
    a.shares(0)
    try:
        return a.client.loss_share(a.header(0), a.key.public)
    except PeerError as exc:
        return exc


def test_loss_share_on_a_non_loss_iteration_is_refused(
    real_b: LocalFederation, key: PrivateKey, breast: BreastSplit
) -> None:
    with attacker(real_b, key, breast) as a:
        answer = loss_share_off_schedule(a)
        assert isinstance(answer, PeerError) and status_of(answer) == Code.FAILED_PRECONDITION, answer
        assert "not a loss check" in str(answer)
        assert_job_ended(a)


def test_planted_loss_share_any_iteration_is_caught(tmp_path: Path, key: PrivateKey, breast: BreastSplit) -> None:
    """PLANTED REGRESSION "loss-share-any-iteration": B answers the share."""
    with passive(tmp_path, "loss-share-any-iteration") as fed, attacker(fed, key, breast) as a:
        answer = loss_share_off_schedule(a)
        assert not isinstance(answer, PeerError), answer
        assert len(answer) == 1  # type: ignore[arg-type]


# --- 5. Small batches without B's consent --------------------------------------

SMALL = min_batch_size(P_A, P_B, allow_small=True)  # 2 * max(p_A + 2, p_B + 1) = 42
SMALL_CONFIG = CONFIG.model_copy(update={"allow_small_batch": True, "batch_size": SMALL, "max_iterations": 20})


def test_small_batches_need_b_consent(real_b: LocalFederation, key: PrivateKey, breast: BreastSplit) -> None:
    """A asking alone (the old behaviour: allow_small_batch was A's say) is refused."""
    assert SMALL == 42
    with attacker(real_b, key, breast) as a:
        err = refused(a.setup, SMALL_CONFIG)
        assert status_of(err) == Code.FAILED_PRECONDITION, err
        assert "does not consent to small batches" in str(err) and "VFL_ALLOW_SMALL_BATCH" in str(err)
        # Without the flag, B's wider floor: 3 * max(p_A, p_B) = 60.
        err = refused(a.setup, CONFIG.model_copy(update={"batch_size": 59}))
        assert status_of(err) == Code.INVALID_ARGUMENT and "expected at least 60" in str(err), err


def test_small_batches_with_b_consent_keep_the_floor(tmp_path: Path, key: PrivateKey, breast: BreastSplit) -> None:
    with passive(tmp_path, VFL_ALLOW_SMALL_BATCH="true") as fed, attacker(fed, key, breast) as a:
        err = refused(a.setup, SMALL_CONFIG.model_copy(update={"batch_size": SMALL - 1}))
        assert status_of(err) == Code.INVALID_ARGUMENT and f"expected at least {SMALL}" in str(err), err
        a.setup(SMALL_CONFIG)
        assert a.job_state() == (0, Phase.SHARES)


# --- 6. Learning-rate and iteration floors -------------------------------------


def floors(fed: LocalFederation, a: MaliciousActive) -> tuple[object, object, object, bool]:
    """A job that cannot move B's model (learning rate 1e-300), one of one
    iteration, and one finished after 2 of its 12 iterations: B's answers, and
    whether B stored the last one's shard (u_B = X_B w_B of a barely trained
    w_B, close to B's random w0)."""
    answers: list[object] = []
    for update in ({"learning_rate": 1e-300}, {"max_iterations": 1}):
        try:
            answers.append(a.setup(CONFIG.model_copy(update=update)))
            a.finish(0, aborted=True)
        except PeerError as exc:
            answers.append(exc)
    a.setup(CONFIG)
    a.iteration(0)
    a.iteration(1)
    try:
        answers.append(a.finish(2, aborted=False))
    except PeerError as exc:
        answers.append(exc)
    shard = fed.workdir / "passive" / "data" / "models" / f"{a.job_id}.json"
    return answers[0], answers[1], answers[2], shard.exists()


def test_training_floors_are_b_own(real_b: LocalFederation, key: PrivateKey, breast: BreastSplit) -> None:
    with attacker(real_b, key, breast) as a:
        lr, one, early, stored = floors(real_b, a)
        assert (
            isinstance(lr, PeerError) and status_of(lr) == Code.INVALID_ARGUMENT and "VFL_MIN_LEARNING_RATE" in str(lr)
        )
        assert (
            isinstance(one, PeerError) and status_of(one) == Code.INVALID_ARGUMENT and "VFL_MIN_ITERATIONS" in str(one)
        )
        assert isinstance(early, PeerError) and status_of(early) == Code.FAILED_PRECONDITION, early
        assert "ran 2 of its 12 iterations" in str(early) and "VFL_MIN_ITERATIONS" in str(early)
        assert not stored
        assert_job_ended(a)


def test_planted_no_training_floors_is_caught(tmp_path: Path, key: PrivateKey, breast: BreastSplit) -> None:
    """PLANTED REGRESSION "no-training-floors": B takes both jobs and stores
    the model of the one finished early."""
    with passive(tmp_path, "no-training-floors") as fed, attacker(fed, key, breast) as a:
        lr, one, early, stored = floors(fed, a)
        assert not isinstance(lr, PeerError) and not isinstance(one, PeerError)
        assert early is True and stored


# --- 7. A malicious B and A's range checks -------------------------------------

MALICIOUS_CONFIG = JobConfig(batch_size=64, epochs=2, seed=5, max_iterations=10, loss_every=0)


def train(client: VflClient, config: JobConfig, ids: list[str], job_id: str) -> client_pb2.JobStatus:
    client.start_training(config, ids, job_id)
    return client.wait(job_id)


def test_a_refuses_crafted_scores_and_loss_share(tmp_path: Path, breast: BreastSplit) -> None:
    """B returns encryptions of +-2^300 as scores and as the loss share: A
    refuses both (OUT_OF_RANGE) rather than answer with their sign."""
    with (
        make_federation(tmp_path, assistant=False, plants={"passive": "malicious-passive"}) as fed,
        VflClient(fed.active_address, timeout_s=120) as client,
    ):
        client.wait_ready(30)
        final = train(client, MALICIOUS_CONFIG.model_copy(update={"loss_every": 1}), breast.train_ids, "with-loss")
        assert final.state == client_pb2.JOB_STATE_FAILED
        assert "loss share: the decrypted value is outside the range" in final.error
        final = train(client, MALICIOUS_CONFIG, breast.train_ids, "no-loss")
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
        with pytest.raises(grpc.RpcError) as info:
            client.predict("no-loss", breast.test_ids[:8])
        assert info.value.code() == Code.OUT_OF_RANGE
        assert "prediction scores: a decrypted score is outside the range" in (info.value.details() or "")


def test_planted_no_active_range_checks_is_caught(tmp_path: Path, breast: BreastSplit) -> None:
    """PLANTED REGRESSION "no-active-range-checks" at A (with the same
    malicious B): A uses the crafted loss share, and its predictions carry
    the sign B chose for each id (1, 0, 1, 0, ...): a sign oracle on p_A."""
    plants = {"passive": "malicious-passive", "active": "no-active-range-checks"}
    with (
        make_federation(tmp_path, assistant=False, plants=plants) as fed,
        VflClient(fed.active_address, timeout_s=120) as client,
    ):
        client.wait_ready(30)
        final = train(client, MALICIOUS_CONFIG.model_copy(update={"loss_every": 1}), breast.train_ids, "with-loss")
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
        # log 2 + (2^300 / 2^64) / m and more: no valid share comes near.
        assert final.loss > 2.0 ** (CRAFTED_SCORE_BITS - 64) / 1000
        assert math.isfinite(final.loss)
        probs = client.predict("with-loss", breast.test_ids[:8])
        np.testing.assert_array_equal(probs, [1.0, 0.0] * 4)


def test_validation_is_no_extra_oracle(real_b: LocalFederation, key: PrivateKey, breast: BreastSplit) -> None:
    """A malicious A asks for validation shares B's schedule does not owe
    (an iteration that is not a check, a second answer for a check with
    other ciphertexts) and for a model of weights B never checked: B
    refuses each and ends the job, so each probe costs A its job."""
    config = CONFIG.model_copy(update={"validation_every": 3})
    holdout = breast.test_ids
    with attacker(real_b, key, breast) as a:
        alignment = a.align(breast.train_ids + holdout)
        # Not a check (3, 6, 9 and the end, 12, are).
        a.setup(config, alignment=alignment, holdout_ids=holdout)
        a.iteration(0)
        a.shares(1)
        err = refused(a.validation, 1, holdout)
        assert status_of(err) == Code.FAILED_PRECONDITION and "not a validation check" in str(err), err
        assert status_of(refused(a.shares, 1)) == Code.NOT_FOUND  # the job is over
        # One answer per check: a second request with fresh ciphertexts is refused.
        a.setup(config, alignment=alignment, holdout_ids=holdout)
        for t in range(3):
            a.iteration(t)
        a.shares(3)
        a.validation(3, holdout)
        err = refused(a.validation, 3, holdout)
        assert status_of(err) == Code.FAILED_PRECONDITION and "was computed" in str(err), err
        # Keep weights of an iteration that was never checked: refused, nothing stored.
        a.setup(config, alignment=alignment, holdout_ids=holdout)
        for t in range(12):
            step4 = a.gradients(t, a.shares(t))
            if t in (3, 6, 9):
                a.validation(t, holdout, best=3 if t > 3 else None)
            a.apply(t, step4)
        a.validation(12, holdout, best=3)
        err = refused(a.finish, 12, False, 5)
        assert status_of(err) == Code.FAILED_PRECONDITION and "keep_iteration" in str(err), err
        assert not (real_b.workdir / "passive" / "data" / "models" / f"{a.job_id}.json").exists()
        a.job_id = ""


def test_a_decay_to_nothing_is_a_small_learning_rate(
    real_b: LocalFederation, key: PrivateKey, breast: BreastSplit
) -> None:
    """A malicious A keeps learning_rate above B's floor but decays it to
    nothing after one step (a model that stays at w0, as a tiny rate would):
    B refuses it like the small rate itself."""
    with attacker(real_b, key, breast) as a:
        decay = {"lr_decay": "step", "decay_rate": 1e-9, "decay_steps": 1}
        err = refused(a.setup, CONFIG.model_copy(update=decay))
        assert status_of(err) == Code.INVALID_ARGUMENT and "config.lr_decay" in str(err), err
        assert "VFL_MIN_LEARNING_RATE" in str(err)
