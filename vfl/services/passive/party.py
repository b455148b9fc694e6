"""B's half of every step, as plain domain code (no gRPC).

A job is a small state machine: for iteration t B accepts, in order, the
residual shares (steps 1-2) for the rows of the agreed schedule, the masked
gradients (steps 3-4) and the unmasked gradient (step 5), each once.
Decryption for A happens only in the masked-gradient step, for a vector of
exactly p_A + 1 ciphertexts under sk_B, once per iteration (twice if the
iteration is restarted after a failure), and the count is on disk before the
decrypted vector leaves B. Any refusal ends the job: a peer that probes gets
one answer, not a series. B is a decryption oracle for nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from prometheus_client.metrics_core import Metric

from vfl.common import dp, metrics, prom
from vfl.common.alignments import AlignmentStore
from vfl.common.checkpoint import JobCheckpoints, unusable_reason
from vfl.common.crypto.backend import CipherVector, HEBackend, PrivateKey, PublicKey, target_fingerprint
from vfl.common.crypto.pool import GATE
from vfl.common.data import PartyData, Scaler
from vfl.common.errors import (
    AlreadyExists,
    DamagedFile,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    VflError,
)
from vfl.common.jobconfig import JobConfig
from vfl.common.metrics import CLOCK
from vfl.common.models import ModelStore, check_job_id
from vfl.common.protocol import steps
from vfl.common.protocol.batching import (
    Batch,
    BatchSchedule,
    batch_schedule,
    check_batch_size,
    coalition_feature_counts,
    min_batch_size,
)
from vfl.common.protocol.optimizers import (
    OptimizerSettings,
    OptimizerState,
    restored_state,
    smallest_learning_rate,
)
from vfl.common.protocol.phases import Phase
from vfl.common.protocol.residual import ResidualModel
from vfl.common.protocol.sessions import ACTIVE, GradientReply, PartyInfo, PassiveSession, TrainingPlan
from vfl.common.serde import StepMessage, rows_array
from vfl.common.storage import canonical_json
from vfl.services.passive.alignment import PassiveAlignments
from vfl.services.passive.policy import PassivePolicy, PredictionBudget
from vfl.services.passive.records import PassiveState

log = logging.getLogger("vfl.passive")
_PARTY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Restarts of an iteration that B allows per job (see _restart_iteration).
MAX_RESTARTS = 3
# How long a loss share waits for step 4 before it is computed regardless.
LOSS_WAIT_S = 1.0
# What a set-up request says (not B's own draws, such as its initial weights).
SETUP_REQUEST = (
    "job_id",
    "config",
    "target_fingerprint",
    "active_features",
    "alignment_id",
    "ids",
    "holdout_ids",
    "active_clip_norm",
    "peer",
)


def setup_digest(setup: dict[str, Any]) -> bytes:
    return hashlib.sha256(canonical_json({k: setup.get(k) for k in SETUP_REQUEST}).encode()).digest()


@dataclass
class PassiveJob:
    job_id: str
    config: JobConfig
    target_fp: bytes
    active_key: PublicKey
    active_features: int
    x: np.ndarray  # standardised (and, under DP, clipped) training rows, in the job's id order
    scaler: Scaler
    w: np.ndarray
    w0: np.ndarray  # B's own initial weights, from its CSPRNG
    peer: str  # the identity that set the job up
    alignment_id: str  # the alignment whose rows the job trains on
    setup_digest: bytes  # of the set-up request, to answer a repeated one again
    population: frozenset[str]  # training and holdout ids: what the model may score
    clip_norm: float  # under DP: C_B, the norm of B's rows; else 0
    active_clip_norm: float  # under DP: C_A as A stated it; else 0
    noise_multiplier: float  # under DP: sigma / sensitivity; else 0
    iteration: int = 0
    phase: Phase = Phase.SHARES
    # Per-iteration state, cleared at the end of each iteration.
    rows: np.ndarray | None = None
    a_enc: CipherVector | None = None
    u: np.ndarray | None = None
    b: np.ndarray | None = None
    own_gradient: Future[steps.MaskedGradient] | None = None
    loss_sent: bool = False
    loss: Future[CipherVector] | None = None
    step4_sent: threading.Event = field(default_factory=threading.Event)
    expected: Sequence[Batch] = ()
    next_share: Future[tuple[int, np.ndarray, CipherVector] | None] | None = None
    last_update_sq_norm: float | None = None
    optimizer: OptimizerState | None = None  # B's own, never sent
    # Validation (config.validation_every): the holdout rows, standardised
    # with the training statistics, in the set-up order; and B's weights of
    # the checked iterations A may still keep (its best so far, the latest).
    x_val: np.ndarray | None = None
    kept_iteration: int | None = None  # the checked iteration stored as the model
    candidates: dict[int, np.ndarray] = field(default_factory=dict)
    # Replay of retried steps: this iteration's answers by request digest, and
    # the last step 5 (kept across B's restart in the checkpoint).
    answered: dict[str, tuple[bytes, Any]] = field(default_factory=dict)
    last_apply: tuple[int, bytes, float] | None = None
    restarts: int = 0
    restarted_at: int = -1
    # The last iteration whose z_A left B (on disk before it does).
    released_at: int = -1
    lock: threading.Lock = field(default_factory=threading.Lock)
    clock_start: dict[str, Any] = field(default_factory=CLOCK.snapshot)
    # With several passive parties (docs/PARTIES.md): the protocol session
    # that runs the job's steps; in memory only (such a job does not resume).
    session: PassiveSession | None = None
    peers_decrypted_at: int = -1  # with several: the last iteration whose step 4 B served (metrics only)

    def replay(self, iteration: int, step: str, digest: bytes) -> Any | None:
        """The answer already given to this very request in this iteration."""
        if iteration == self.iteration and step in self.answered and self.answered[step][0] == digest:
            log.info("event=step_replayed job=%s iteration=%d step=%s", self.job_id, iteration, step)
            return self.answered[step][1]
        return None

    @property
    def per_epoch(self) -> int:
        return self.expected.per_epoch if isinstance(self.expected, BatchSchedule) else max(1, len(self.expected))

    def epsilon_spent(self) -> float | None:
        """Epsilon spent (at dp_delta) on X_B by the z_A released so far."""
        if not self.config.dp:
            return None
        return dp.epsilon_so_far(
            self.noise_multiplier, self.config.dp_delta, self.released_at, self.per_epoch, self.restarts
        )

    def loss_iteration(self, iteration: int) -> bool:
        every = self.config.loss_every
        return bool(every) and ((iteration + 1) % every == 0 or iteration + 1 == len(self.expected))

    def expect(self, iteration: int, phase: Phase) -> None:
        if iteration != self.iteration or phase != self.phase:
            raise FailedPrecondition(
                f"header.iteration: job {self.job_id!r} expects {self.phase.value} of iteration "
                f"{self.iteration}, got {phase.value} of iteration {iteration}"
            )


@dataclass(frozen=True)
class SetupReply:
    passive_features: int
    clip_norm: float  # under DP: C_B; else 0
    share_clip: float  # under DP: the bound on |b_i|; else 0
    scores_any_row: bool = False  # VFL_PREDICT_SCOPE=any


@contextmanager
def _counted_refusal() -> Iterator[None]:
    """A step that asks B to decrypt, refused by the one-decryption rule
    (out of order, or a second, different request in one iteration): one
    vfl_decryptions_total{result="refused"}."""
    try:
        yield
    except FailedPrecondition:
        prom.count_refused_decryption()
        raise


class PassiveParty:
    def __init__(
        self,
        data: PartyData,
        key: PrivateKey,
        backend: HEBackend,
        data_dir: Path,
        policy: PassivePolicy | None = None,
        test_weights_seed: int | None = None,
    ) -> None:
        self.data = data
        self.test_weights_seed = test_weights_seed
        self.key = key
        self.backend = backend
        self.policy = policy or PassivePolicy()
        self.models = ModelStore(data_dir)
        self.checkpoints = JobCheckpoints(data_dir)
        self.budget = PredictionBudget(data_dir, self.policy)
        self.alignments = PassiveAlignments(data, AlignmentStore(data_dir), self.models, self.policy)
        self._targets: dict[bytes, PublicKey] = {}
        self._jobs: dict[str, PassiveJob] = {}
        # Jobs a restart could not restore: (target key or None if unknown, damaged, why).
        self._unresumable: dict[str, tuple[bytes | None, bool, str]] = {}
        self._lock = threading.Lock()
        # Overlaps B's X_B^T [[a]] with A's X_A^T [[b]] (both step 3).
        # One thread each, so that no task waits behind another: B's own
        # step-3 product, the next batch's share, and the loss share (which
        # waits for step 4).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="passive-step3")
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="passive-ahead")
        self._loss = ThreadPoolExecutor(max_workers=4, thread_name_prefix="passive-loss")

    def scraped_metrics(self) -> list[Metric]:
        """vfl_jobs{state="running"} (the jobs B runs now) and the prediction
        ids left per peer identity (vfl_prediction_ids_left), read at scrape time."""
        return [prom.jobs_metric({"running": len(self._jobs)}), *self.budget.left_metrics()]

    # --- key exchange and set-up ------------------------------------------

    def exchange_keys(self, active_key: PublicKey) -> bytes:
        if active_key.fingerprint == self.key.public.fingerprint:
            raise InvalidArgument("active_key: is this party's own key")
        self.backend.require_scheme(active_key, "active_key")
        # Tables for the peer's key grow on first use anyway; growing them in
        # the background keeps key exchange off the job's critical path.
        self._ahead.submit(self.backend.prepare, active_key)
        fp = target_fingerprint(active_key, self.key.public)
        with self._lock:
            self._targets[fp] = active_key
        log.info("event=keys_exchanged target=%s", fp.hex()[:16])
        return fp

    def _job(self, job_id: str, target_fp: bytes) -> PassiveJob:
        job = self._jobs.get(job_id)
        if job is None:
            gone = self._unresumable.get(job_id)
            if gone is not None and gone[0] in (None, target_fp):
                # A restart found this job's checkpoint unusable: say why (DATA_LOSS if damaged).
                _, damaged, problem = gone
                raise DamagedFile(job_id, "checkpoint", problem) if damaged else FailedPrecondition(problem)
            raise NotFound(f"header.job_id: no running job {job_id[:64]!r} at the passive party")
        if target_fp != job.target_fp:
            # A refusal like any other: the job ends (see _refusal_ends_job).
            self._end_job(job, "a step under another target key")
            raise FailedPrecondition("header.target_fingerprint: not the target key of this job")
        return job

    def _check_policy(self, config: JobConfig, iterations: int, active_clip_norm: float, peer: str) -> None:
        """B's own configuration decides, whatever A asks for."""
        p = self.policy
        if config.learning_rate < p.min_learning_rate:
            raise InvalidArgument(
                f"config.learning_rate: the passive party requires at least {p.min_learning_rate:g} "
                f"(VFL_MIN_LEARNING_RATE at B), got {config.learning_rate:g}"
            )
        last_rate = smallest_learning_rate(OptimizerSettings.of(config), iterations)
        if last_rate < p.min_learning_rate:
            # A decay to nothing would be a small learning rate by another name.
            raise InvalidArgument(
                f"config.lr_decay: the learning rate decays to {last_rate:.3g} by the last iteration; the passive "
                f"party requires at least {p.min_learning_rate:g} (VFL_MIN_LEARNING_RATE at B)"
            )
        if iterations < p.min_iterations:
            raise InvalidArgument(
                f"config.max_iterations: the job's schedule has {iterations} iterations; the passive party "
                f"requires at least {p.min_iterations} (VFL_MIN_ITERATIONS at B)"
            )
        if config.allow_small_batch and not p.allow_small_batch:
            raise FailedPrecondition(
                "config.allow_small_batch: the passive party does not consent to small batches "
                "(VFL_ALLOW_SMALL_BATCH at B)"
            )
        if p.max_dp_epsilon > 0 and not (config.dp and config.dp_epsilon <= p.max_dp_epsilon):
            raise FailedPrecondition(
                f"config.dp_epsilon: the passive party requires differential privacy with epsilon at most "
                f"{p.max_dp_epsilon:g} (VFL_MAX_DP_EPSILON at B)"
            )
        if config.dp and not active_clip_norm > 0:
            raise InvalidArgument("spec.active_clip_norm: expected > 0 with config.dp_epsilon set")
        limit = p.models_per_peer(self.data.n_features)
        with self._lock:
            running = sum(1 for j in self._jobs.values() if j.peer == peer)
        stored = sum(1 for m in self.models.list_ids() if self._shard_peer(m) == peer)
        if stored + running >= limit:
            raise ResourceExhausted(
                f"spec.job_id: the passive party keeps at most {limit} models for identity {peer!r} "
                f"({stored} stored, {running} training; VFL_MAX_MODELS_PER_PEER at B)"
            )

    def _check_several_parties(self, config: JobConfig, party_name: str, peers: Sequence[PartyInfo]) -> None:
        """A job with other passive parties: what the first version serves."""
        names = [party_name, *(p.name for p in peers)]
        if any(not _PARTY_NAME.fullmatch(n) for n in names) or ACTIVE in names or len(set(names)) != len(names):
            raise InvalidArgument(
                "spec.party_name, spec.peers: expected distinct names of 1-64 characters of [A-Za-z0-9_.-], "
                f"none {ACTIVE!r}"
            )
        for p in peers:
            self.backend.require_scheme(p.key, f"spec.peers[{p.name}].key")
            if p.features < 1:
                raise InvalidArgument(f"spec.peers[{p.name}].features: expected at least 1")
        if peers and config.residual == "poly5":
            raise FailedPrecondition("config.residual: poly5 is served with one passive party only")
        unserved = [
            name
            for name, on in (
                ("validation_every", bool(config.validation_every)),
                ("dp_epsilon", config.dp),
            )
            if on
        ]
        if unserved:
            raise FailedPrecondition(
                f"config.{unserved[0]}: not served yet with several passive parties or residual poly5 (set it to 0); "
                "see docs/PARTIES.md"
            )

    def _shard_peer(self, model_id: str) -> str | None:
        try:
            peer = self.models.load(model_id).get("peer")
        except (OSError, ValueError, VflError):
            return None
        return str(peer) if peer is not None else None

    def setup_job(
        self,
        job_id: str,
        config: JobConfig,
        target_fp: bytes,
        active_features: int,
        n_rows: int,
        alignment_id: str,
        rows: list[int],
        holdout_rows: Sequence[int] = (),
        active_clip_norm: float = 0.0,
        peer: str = "",
        party_name: str = "",
        peers: Sequence[PartyInfo] = (),
    ) -> SetupReply:
        check_job_id(job_id)
        # Other passive parties, or the polynomial residual (its step 0 is a
        # session step): the job runs through this party's PassiveSession.
        in_session = bool(peers) or config.residual == "poly5"
        if in_session:
            self._check_several_parties(config, party_name, peers)
        active_key = self._targets.get(target_fp)
        if active_key is None:
            raise FailedPrecondition("spec.target_fingerprint: unknown target key; call ExchangeKeys first")
        if len(rows) != n_rows:
            raise InvalidArgument(f"rows: spec.n_rows says {n_rows}, got {len(rows)} rows")
        # Positions in the alignment, mapped to B's own ids here: no id travels.
        alignment = self.alignments.load(alignment_id, peer)
        if alignment.purpose != "training":
            raise FailedPrecondition(f"spec.alignment_id: alignment {alignment_id!r} is for prediction, not training")
        ids = alignment.ids_at(list(rows), "rows")
        holdout_ids = alignment.ids_at(list(holdout_rows), "holdout_rows")
        if set(ids) & set(holdout_ids):
            raise InvalidArgument("holdout_rows: a row is also a training row")
        if active_features < 1:
            raise InvalidArgument("spec.active_features: expected at least 1")
        # With several passive parties, a coalition of all but one party sees
        # more equations per batch than A alone: the floor counts its features.
        p_a, p_b = coalition_feature_counts(active_features, [self.data.n_features, *(p.features for p in peers)])
        check_batch_size(config.batch_size, p_a, p_b, config.allow_small_batch)
        floor = min_batch_size(p_a, p_b, config.allow_small_batch)
        if n_rows < floor:
            raise InvalidArgument(f"spec.n_rows: expected at least {floor} training rows, got {n_rows}")
        if config.validation_every and len(set(holdout_ids)) < floor:
            # The validation loss is one scalar over these rows: as few rows as
            # a batch may have, or fewer unknowns would fit in it.
            raise InvalidArgument(
                f"config.validation_every: expected at least {floor} distinct holdout rows to validate on, "
                f"got {len(set(holdout_ids))}"
            )
        request = {
            "job_id": job_id,
            "config": config.model_dump(),
            "target_fingerprint": target_fp.hex(),
            "active_features": active_features,
            "alignment_id": alignment_id,
            "ids": ids,
            "holdout_ids": list(holdout_ids),
            "active_clip_norm": active_clip_norm,
            "peer": peer,
        }
        if in_session:
            request["party_name"] = party_name
            request["peers"] = [{"name": p.name, "key": p.key.to_dict(), "features": p.features} for p in peers]
        repeated = self._repeated_setup(request)
        if repeated is not None:
            return repeated
        schedule = batch_schedule(n_rows, config.batch_size, config.epochs, config.seed, floor, config.max_iterations)
        self._check_policy(config, len(schedule), active_clip_norm, peer)
        self.data.positions(list(holdout_ids), "holdout_ids")
        with self._lock:
            if job_id in self._jobs or self.models.exists(job_id):
                raise AlreadyExists(f"spec.job_id: job {job_id!r} already exists at the passive party")
        w0 = steps.initial_weights(self.test_weights_seed, job_id, self.data.n_features, config.init_scale)
        setup = {**request, "active_key": active_key.to_dict(), "w0": w0.tolist()}
        job = self._build_job(setup)
        try:
            self.checkpoints.save_setup(job_id, setup)
            self._save_state(job)
        except BaseException:
            self.checkpoints.remove(job_id)  # a full disk leaves no half-set-up job behind
            raise
        job.next_share = self._ahead.submit(self._encrypt_share, job, 0)
        with self._lock:
            self._jobs[job_id] = job
            self._unresumable.pop(job_id, None)  # a new job under the old id
        log.info("event=job_setup job=%s rows=%d features=%d", job_id, n_rows, self.data.n_features)
        return self._setup_reply(job)

    def _repeated_setup(self, request: dict[str, Any]) -> SetupReply | None:
        """The answer again to a SetupJob repeated because its answer was lost
        (the connection broke after B set the job up): the same request from
        the same peer, for a job that has not started. Otherwise A would be
        refused its own job (ALREADY_EXISTS), and the job it cannot see would
        count against its quota here."""
        with self._lock:
            job = self._jobs.get(request["job_id"])
        if job is None or job.setup_digest != setup_digest(request):
            return None
        with job.lock:
            if job.iteration or job.phase != Phase.SHARES or job.released_at >= 0 or job.restarts:
                return None
        log.info("event=setup_replayed job=%s", job.job_id)
        return self._setup_reply(job)

    def _setup_reply(self, job: PassiveJob) -> SetupReply:
        share_clip = self.policy.dp_share_clip if job.config.dp else 0.0
        return SetupReply(self.data.n_features, job.clip_norm, share_clip, self.policy.predict_scope == "any")

    def _build_job(self, setup: dict[str, Any]) -> PassiveJob:
        config = JobConfig.model_validate(setup["config"])
        ids = list(setup["ids"])
        active_features = int(setup["active_features"])
        positions = self.data.positions(ids, "ids")
        raw = self.data.features[positions]
        scaler = Scaler.fit(raw, config.standardize)
        x = scaler.transform(raw)
        clip = active_clip = multiplier = 0.0
        peers = [
            PartyInfo(str(p["name"]), PublicKey.from_dict(p["key"]), int(p["features"])) for p in setup.get("peers", ())
        ]
        p_a, p_b = coalition_feature_counts(active_features, [self.data.n_features, *(p.features for p in peers)])
        floor = min_batch_size(p_a, p_b, config.allow_small_batch)
        # B expands the same seeded schedule as A: it accepts only these rows,
        # and encrypts its share of the next batch ahead (see _share_for).
        expected = batch_schedule(len(ids), config.batch_size, config.epochs, config.seed, floor, config.max_iterations)
        if config.dp:
            clip = self.policy.dp_clip_norm or dp.default_clip_norm(self.data.n_features)
            x = dp.clip_rows(x, clip)
            active_clip = float(setup["active_clip_norm"])
            releases = dp.releases_per_row(len(expected), expected.per_epoch)
            multiplier = dp.noise_multiplier(config.dp_epsilon, config.dp_delta, releases)
        w0 = np.asarray(setup["w0"], dtype=np.float64)
        x_val = None
        if config.validation_every:
            x_val = scaler.transform(self.data.features[self.data.positions(list(setup["holdout_ids"]), "holdout_ids")])
        job = PassiveJob(
            job_id=setup["job_id"],
            config=config,
            target_fp=bytes.fromhex(setup["target_fingerprint"]),
            active_key=PublicKey.from_dict(setup["active_key"]),
            active_features=active_features,
            x=x,
            scaler=scaler,
            w=w0.copy(),
            w0=w0,
            peer=str(setup["peer"]),
            alignment_id=str(setup.get("alignment_id", "")),
            setup_digest=setup_digest(setup),
            population=frozenset(ids) | frozenset(setup["holdout_ids"]),
            clip_norm=clip,
            active_clip_norm=active_clip,
            noise_multiplier=multiplier,
        )
        job.expected = expected
        job.x_val = x_val
        if "party_name" in setup:  # a session job (see setup_job)
            me = PartyInfo(str(setup["party_name"]), self.key.public, self.data.n_features)
            active = PartyInfo(ACTIVE, job.active_key, active_features)
            job.session = PassiveSession(me.name, self.backend, self.key, x, w0, TrainingPlan.of(config), active, peers)
        return job

    def _save_state(self, job: PassiveJob, durable: bool = False) -> None:
        state = PassiveState(
            iteration=job.iteration,
            w=job.w,
            optimizer=None if job.optimizer is None else job.optimizer.to_record(),
            candidates=job.candidates,
            last_update_sq_norm=job.last_update_sq_norm,
            last_apply=job.last_apply,
            restarts=job.restarts,
            restarted_at=job.restarted_at,
            released_at=job.released_at,
        )
        self.checkpoints.save_state(job.job_id, state.to_record(), durable=durable)

    def restore_jobs(self) -> int:
        """Resume the jobs that were running when this process stopped: each
        at the start of its checkpointed iteration (A re-sends that
        iteration's steps; if B had released that iteration's z_A, A's
        re-sent shares count as a restart). Returns how many."""
        restored = 0
        for saved in self.checkpoints.load_all():
            if saved.missing == {"state"} and self.models.exists(saved.job_id):
                # Stopped between storing the model and removing the checkpoint: done.
                self.checkpoints.remove(saved.job_id)
                continue
            if saved.problem:
                self._unresumable_job(saved.job_id, saved.setup, saved.problem, damaged=saved.damaged)
                continue
            setup, state = saved.setup, saved.state
            assert setup is not None and state is not None
            if "party_name" in setup:
                problem = (
                    f"job {saved.job_id}: a job with several passive parties (or residual poly5) keeps its state "
                    "in memory only and cannot resume after a restart (docs/PARTIES.md)"
                )
                self._unresumable_job(saved.job_id, setup, problem, damaged=False)
                continue
            try:
                job = self._build_job(setup)
                saved_state = PassiveState.from_record(state)
                if saved_state.w.shape != job.w.shape:
                    raise ValueError("w: weights of another width")
                job.iteration, job.w, job.candidates = saved_state.iteration, saved_state.w, saved_state.candidates
                settings = OptimizerSettings.of(job.config)
                job.optimizer = restored_state(saved_state.optimizer, settings, len(job.w), job.iteration)
                job.last_update_sq_norm, job.last_apply = saved_state.last_update_sq_norm, saved_state.last_apply
                job.restarts, job.restarted_at = saved_state.restarts, saved_state.restarted_at
                job.released_at = saved_state.released_at
            except (KeyError, TypeError, ValueError, VflError) as exc:
                why = unusable_reason(exc)
                problem = f"job {saved.job_id}: its checkpoint cannot be used ({why}); the job cannot resume"
                self._unresumable_job(saved.job_id, setup, problem, damaged=False)
                continue
            job.next_share = self._ahead.submit(self._encrypt_share, job, job.iteration)
            with self._lock:
                self._targets[job.target_fp] = job.active_key
                self._jobs[job.job_id] = job
            restored += 1
            log.info("event=job_restored job=%s iteration=%d", job.job_id, job.iteration)
        return restored

    def _unresumable_job(self, job_id: str, setup: dict[str, Any] | None, problem: str, damaged: bool) -> None:
        """A job B cannot restore: its files go (a damaged one is in
        quarantine already) and A's next call for it is answered with
        `problem`, so that A fails the job with B's reason (see _job)."""
        self.checkpoints.remove(job_id)
        target: bytes | None = None
        try:
            target = bytes.fromhex((setup or {})["target_fingerprint"])
        except (KeyError, TypeError, ValueError):
            pass  # the set-up is lost: any caller of this job id hears why
        with self._lock:
            self._unresumable[job_id] = (target, damaged, problem)
        log.warning("event=job_not_restored job=%s error=%r", job_id, problem)

    def _release_unresumable(self, job_id: str, target_fp: bytes) -> bool:
        """A's abort of a job B could not restore: nothing is left to drop."""
        with self._lock:
            gone = self._unresumable.get(job_id)
            if gone is None or gone[0] not in (None, target_fp):
                return False
            del self._unresumable[job_id]
        log.info("event=job_ended job=%s reason=aborted by the active party (not restored)", job_id)
        return True

    def job_state(self, job_id: str, target_fp: bytes) -> tuple[int, Phase]:
        job = self._job(job_id, target_fp)
        with job.lock:
            return job.iteration, job.phase

    @contextmanager
    def _refusal_ends_job(self, job: PassiveJob) -> Iterator[None]:
        """Any refusal or range violation in a step ends the job at B (A
        hears it as the step's error, and its job fails): a probing peer gets
        one answer, never a series of them."""
        try:
            yield
        except VflError as exc:
            self._end_job(job, f"refused: {exc}")
            raise

    def _end_job(self, job: PassiveJob, reason: str) -> None:
        with self._lock:
            if self._jobs.get(job.job_id) is not job:
                return
            self._jobs.pop(job.job_id, None)
        job.step4_sent.set()  # release a loss share still waiting for step 4
        self.checkpoints.remove(job.job_id)
        log.warning("event=job_ended job=%s iteration=%d reason=%s", job.job_id, job.iteration, reason[:200])

    # --- training steps ---------------------------------------------------

    @GATE.working
    def residual_shares(self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage) -> CipherVector:
        """Steps 1-2: take [[a_S]]_A, answer [[b_S]]_B, and start step 3."""
        job = self._job(job_id, target_fp)
        if job.session is not None:
            return self._session_shares(job, iteration, msg)
        with job.lock, self._refusal_ends_job(job):
            digest = msg.digest()
            replayed = job.replay(iteration, "shares", digest)
            if replayed is not None:
                return cast(CipherVector, replayed)
            job.expect(iteration, job.phase if iteration == job.iteration else Phase.SHARES)
            rows = rows_array(msg.rows, job.x.shape[0], "rows")
            # Only the agreed schedule's rows: a restart cannot ask about
            # other rows, and the batch floor holds by construction.
            if not np.array_equal(rows, job.expected[iteration].rows):
                raise InvalidArgument(f"rows: not the rows of iteration {iteration} of the job's agreed schedule")
            a_enc = msg.ciphers(job.active_key, "ciphertexts")
            a_enc.require_length(rows.size, "ciphertexts")
            if job.phase != Phase.SHARES or job.released_at == iteration:
                self._restart_iteration(job)
            job.expect(iteration, Phase.SHARES)
            x = job.x[rows]
            u, b, b_enc = self._share_for(job, iteration, rows)
            job.own_gradient = self._pool.submit(GATE.working(steps.masked_encrypted_gradient), self.backend, x, a_enc)
            # A asks for the loss share on these iterations (and on the last):
            # compute it after B's own product, before A asks.
            job.loss = None
            job.step4_sent.clear()
            if job.loss_iteration(iteration):
                job.loss = self._loss.submit(
                    self._loss_after_step4, job.step4_sent, a_enc, u, job.config.residual_model
                )
            job.rows, job.a_enc, job.u, job.b, job.loss_sent = rows, a_enc, u, b, False
            job.phase = Phase.GRADIENTS
            job.answered = {"shares": (digest, b_enc)}
            return b_enc

    # --- jobs with several passive parties: the session runs the steps --------

    def several(self, job_id: str) -> bool:
        """Whether the job has other passive parties (its steps carry named vectors)."""
        job = self._jobs.get(job_id)
        return job is not None and job.session is not None

    def _session_of(self, job_id: str, target_fp: bytes) -> tuple[PassiveJob, PassiveSession]:
        job = self._job(job_id, target_fp)
        if job.session is None:
            raise FailedPrecondition(
                f"header.job_id: job {job_id[:64]!r} has no other passive party and residual {job.config.residual}"
            )
        return job, job.session

    def _session_shares(self, job: PassiveJob, iteration: int, msg: StepMessage) -> CipherVector:
        assert job.session is not None
        with job.lock, self._refusal_ends_job(job):
            rows = rows_array(msg.rows, job.x.shape[0], "rows")
            if iteration >= len(job.expected) or not np.array_equal(rows, job.expected[iteration].rows):
                raise InvalidArgument(f"rows: not the rows of iteration {iteration} of the job's agreed schedule")
            a_enc = msg.ciphers(job.active_key, "ciphertexts")
            return job.session.exchange_residual_shares(iteration, rows.tolist(), a_enc)

    @GATE.working
    def session_score_powers(self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage) -> CipherVector:
        """Step 0 (residual poly5): [[cross + s]]_A for the batch's rows of the agreed schedule."""
        job, session = self._session_of(job_id, target_fp)
        with job.lock, self._refusal_ends_job(job):
            rows = rows_array(msg.rows, job.x.shape[0], "rows")
            if iteration >= len(job.expected) or not np.array_equal(rows, job.expected[iteration].rows):
                raise InvalidArgument(f"rows: not the rows of iteration {iteration} of the job's agreed schedule")
            powers = msg.ciphers(job.active_key, "ciphertexts")
            return session.exchange_score_powers(iteration, rows.tolist(), powers)

    @GATE.working
    def session_masked_gradients(
        self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage
    ) -> GradientReply:
        """Step 3 with other passive parties: A's masked gradient to decrypt,
        the other parties' relayed shares; B's masked gradients under every key."""
        job, session = self._session_of(job_id, target_fp)
        with job.lock, self._refusal_ends_job(job):
            grad_a = msg.ciphers(self.key.public, "ciphertexts")
            shares = msg.party_cipher_vectors({n: p.key for n, p in session.peers.items()}, "party_ciphertexts")
            with _counted_refusal():
                reply = session.exchange_masked_gradients(iteration, grad_a, shares)
            if job.released_at < iteration:  # not a retry answered from memory
                prom.count_served_decryption()
            job.released_at = max(job.released_at, iteration)
            return reply

    @GATE.working
    def session_decrypt(self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage) -> dict[str, list[int]]:
        """Step 4 for the other passive parties: their masked gradients under this party's key."""
        job, session = self._session_of(job_id, target_fp)
        with job.lock, self._refusal_ends_job(job):
            grads = msg.party_cipher_vectors({n: self.key.public for n in session.peers}, "party_ciphertexts")
            with _counted_refusal():
                reply = session.decrypt_peer_gradients(iteration, grads)
            if job.peers_decrypted_at < iteration:  # not a retry answered from memory
                prom.count_served_decryption(len(reply))
                job.peers_decrypted_at = iteration
            return reply

    @GATE.working
    def session_apply(self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage) -> None:
        """Step 5 with other passive parties: A's decryption (residues) and each other's (party_residues)."""
        job, session = self._session_of(job_id, target_fp)
        with job.lock, self._refusal_ends_job(job):
            if session.next_iteration == iteration + 1 and job.last_apply is not None:
                if job.last_apply[:2] == (iteration, msg.digest()):
                    return  # a retry of the step 5 just applied
            z = {ACTIVE: msg.residues(job.active_key, "residues")}
            z.update(msg.party_residue_lists({n: p.key for n, p in session.peers.items()}, "party_residues"))
            session.apply_gradient(iteration, z)
            job.w, job.iteration = session.w, session.next_iteration
            job.last_apply = (iteration, msg.digest(), 0.0)
            prom.ITERATIONS.inc()

    @staticmethod
    def _require_loss_iteration(job: PassiveJob, iteration: int) -> None:
        if not job.loss_iteration(iteration):
            raise FailedPrecondition(
                f"header.iteration: iteration {iteration} is not a loss check of this job "
                "(config.loss_every, and the last iteration)"
            )

    @GATE.working
    def session_loss_terms(self, job_id: str, iteration: int, target_fp: bytes) -> dict[str, CipherVector]:
        """The loss check's cross terms with the passive parties after this one."""
        job, session = self._session_of(job_id, target_fp)
        with job.lock, self._refusal_ends_job(job):
            self._require_loss_iteration(job, iteration)
            return dict(session.loss_cross_terms(iteration))

    @GATE.working
    def session_decrypt_loss_terms(self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage) -> None:
        """The loss check's cross terms of the passive parties before this one, under its key."""
        job, session = self._session_of(job_id, target_fp)
        with job.lock, self._refusal_ends_job(job):
            self._require_loss_iteration(job, iteration)
            earlier = {n: self.key.public for n in session.peers if n < session.me}
            session.decrypt_loss_terms(iteration, msg.party_cipher_vectors(earlier, "party_ciphertexts"))

    def _restart_iteration(self, job: PassiveJob) -> None:
        """A starts the current iteration again with a new request (it lost its
        state, or B's answer, in a failure; or B restarted after releasing
        this iteration's z_A). Allowed once per iteration and MAX_RESTARTS
        times per job, and on disk before anything else: each restart lets A
        have one more vector of this batch decrypted, and the batch floor
        assumes at most DECRYPTIONS_PER_ITERATION."""
        if job.restarted_at == job.iteration or job.restarts >= MAX_RESTARTS:
            prom.count_refused_decryption()  # a restart would let A have this batch decrypted again
            raise FailedPrecondition(
                f"header.iteration: iteration {job.iteration} of job {job.job_id!r} was already started; "
                f"B restarts an iteration once, and at most {MAX_RESTARTS} times per job"
            )
        if job.own_gradient is not None:
            futures.wait([job.own_gradient])
        job.step4_sent.set()
        job.restarts += 1
        job.restarted_at = job.iteration
        job.phase = Phase.SHARES
        job.answered = {}
        job.own_gradient = job.a_enc = job.u = job.b = job.rows = job.loss = None
        self._save_state(job, durable=True)
        log.warning(
            "event=iteration_restarted job=%s iteration=%d restarts=%d", job.job_id, job.iteration, job.restarts
        )

    def _share(self, job: PassiveJob, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """u_B and B's residual share b for the rows (b = u_B / 4 for the
        Taylor residual, u_B for linear); under DP, b clipped to the bound
        B's noise on z_A is calibrated to (and u_B = 4 b with it)."""
        model = job.config.residual_model
        b = steps.passive_residual_share(job.x[rows], job.w, model)
        if job.config.dp:
            b = np.clip(b, -self.policy.dp_share_clip, self.policy.dp_share_clip)
        return model.passive_score(b), b

    def _encrypt_share(self, job: PassiveJob, iteration: int) -> tuple[int, np.ndarray, CipherVector] | None:
        """Step 2 ahead of time: B's share for the batch it expects next, under
        the weights it has now (they change only at step 5)."""
        if iteration >= len(job.expected):
            return None
        rows = job.expected[iteration].rows
        with GATE.busy():
            _, b = self._share(job, rows)
            return iteration, rows, steps.first_intermediate_share(self.backend, self.key.public, b)

    def _share_for(
        self, job: PassiveJob, iteration: int, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, CipherVector]:
        """u_B, b and [[b_S]]_B for the rows A sent: the share encrypted ahead
        if it is still there (not after a restart), else encrypted now."""
        u, b = self._share(job, rows)
        ahead = job.next_share.result() if job.next_share is not None else None
        job.next_share = None
        if ahead is not None and ahead[0] == iteration and np.array_equal(ahead[1], rows):
            return u, b, ahead[2]
        return u, b, steps.first_intermediate_share(self.backend, self.key.public, b)

    def _release_noise(self, job: PassiveJob, length: int) -> np.ndarray:
        """Under DP: B's noise on z_A, calibrated to the sensitivity of
        [X_A, 1]^T b to one row of X_B (|b_i| clipped)."""
        sensitivity = 2.0 * self.policy.dp_share_clip * float(np.sqrt(job.active_clip_norm**2 + 1.0))
        return dp.gaussian_noise(job.noise_multiplier * sensitivity, length)

    @GATE.working
    def masked_gradients(
        self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage
    ) -> tuple[list[int], CipherVector]:
        """Steps 3-4: decrypt A's masked gradient, answer z_A and B's own."""
        job = self._job(job_id, target_fp)
        with job.lock, self._refusal_ends_job(job):
            digest = msg.digest()
            replayed = job.replay(iteration, "gradients", digest)
            if replayed is not None:
                return cast(tuple[list[int], CipherVector], replayed)
            with _counted_refusal():  # e.g. a second, different masked gradient in this iteration
                job.expect(iteration, Phase.GRADIENTS)
            grad_a = msg.ciphers(self.key.public, "ciphertexts")
            assert job.own_gradient is not None
            # B's own product first: if it failed, nothing is decrypted for A.
            own = job.own_gradient.result()
            z_a = steps.decrypt_masked_gradient(self.backend, self.key, grad_a, job.active_features + 1)
            if job.config.dp:
                z_a = steps.add_release_noise(self.key, z_a, self._release_noise(job, len(z_a)))
            job.released_at = iteration
            self._record_release(job)
            prom.count_served_decryption()
            job.phase = Phase.APPLY
            job.step4_sent.set()
            job.answered["gradients"] = (digest, (z_a, own.ciphers))
            return z_a, own.ciphers

    def _record_release(self, job: PassiveJob) -> None:
        """On disk (flushed) before z_A leaves B: a B that crashes and
        restarts still counts this iteration's decryption."""
        self._save_state(job, durable=True)

    @GATE.working
    def apply_gradient(self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage) -> float:
        """Step 5: remove R_B, add X_B^T b, update w_B."""
        job = self._job(job_id, target_fp)
        with job.lock, self._refusal_ends_job(job):
            digest = msg.digest()
            if job.last_apply is not None and job.last_apply[:2] == (iteration, digest):
                log.info("event=step_replayed job=%s iteration=%d step=apply", job_id, iteration)
                return job.last_apply[2]
            job.expect(iteration, Phase.APPLY)
            assert job.own_gradient is not None and job.rows is not None and job.b is not None
            z_b = msg.residues(job.active_key, "residues")
            if len(z_b) != job.x.shape[1]:
                raise InvalidArgument(f"residues: expected {job.x.shape[1]} values, got {len(z_b)}")
            x = job.x[job.rows]
            own = job.own_gradient.result()
            # Under DP, z_B carries A's noise, calibrated to B's row norm.
            noise_std = job.noise_multiplier * dp.label_sensitivity(job.clip_norm)
            new_w, job.optimizer = steps.update_own_weights(
                [steps.Decryption(z_b, own.mask, job.active_key)],
                x,
                job.b,
                job.w,
                penalised=np.ones_like(job.w),
                l2=job.config.l2,
                noise_std=noise_std,
                optimizer=OptimizerSettings.of(job.config),
                state=job.optimizer,
            )
            # Under DP the norm would be an un-noised function of X_B: not reported.
            update = 0.0 if job.config.dp else float(np.sum((new_w - job.w) ** 2))
            job.last_update_sq_norm = update
            job.w = new_w
            level = logging.INFO if (iteration + 1) % 10 == 0 else logging.DEBUG
            log.log(level, "event=iteration_applied job=%s iteration=%d", job_id, iteration + 1)
            job.iteration += 1
            prom.ITERATIONS.inc()
            job.phase = Phase.SHARES
            job.last_apply = (iteration, digest, update)
            job.answered = {}
            self._save_state(job)
            job.next_share = self._ahead.submit(self._encrypt_share, job, job.iteration)
            job.own_gradient = job.a_enc = job.u = job.b = job.rows = job.loss = None
            return update

    @GATE.working
    def loss_share(self, job_id: str, iteration: int, target_fp: bytes) -> CipherVector:
        job = self._job(job_id, target_fp)
        if job.session is not None:
            with job.lock, self._refusal_ends_job(job):
                self._require_loss_iteration(job, iteration)
                return job.session.loss_share(iteration)
        with job.lock, self._refusal_ends_job(job):
            if job.iteration == iteration and "loss" in job.answered:
                # A retry: the same ciphertext again, never a second computation.
                pending = job.answered["loss"][1]
            else:
                if not job.loss_iteration(iteration):
                    raise FailedPrecondition(
                        f"header.iteration: iteration {iteration} is not a loss check of this job "
                        "(config.loss_every, and the last iteration)"
                    )
                if job.iteration != iteration or job.phase == Phase.SHARES:
                    raise FailedPrecondition(
                        f"header.iteration: the loss share of iteration {iteration} is available "
                        "after that iteration's residual shares"
                    )
                assert job.a_enc is not None and job.u is not None
                job.loss_sent = True
                if job.loss is None:
                    job.loss = self._loss.submit(
                        steps.passive_loss_share, self.backend, job.a_enc, job.u, job.config.residual_model
                    )
                pending = job.loss
                job.answered["loss"] = (b"", pending)
        # Outside the lock: A's step 4 may run meanwhile.
        return cast(CipherVector, pending.result())

    def _loss_after_step4(
        self, step4_sent: threading.Event, a_enc: CipherVector, u: np.ndarray, model: ResidualModel
    ) -> CipherVector:
        # After B's answer to step 4, while A decrypts: off the critical path
        # and not competing with step 4 for the GIL. If step 4 does not come
        # soon, compute it anyway rather than hold a thread.
        step4_sent.wait(timeout=LOSS_WAIT_S)
        with GATE.busy():
            return steps.passive_loss_share(self.backend, a_enc, u, model)

    @GATE.working
    def validation_share(self, job_id: str, target_fp: bytes, msg: StepMessage) -> CipherVector:
        """Validation check: [[sum_i a_i u_B,i + c sum_i u_B,i^2]]_A over the
        job's holdout rows, with B's weights of the checked iteration (before
        its step 5; after the last iteration, the final ones). B keeps those
        weights until A names a better check."""
        job = self._job(job_id, target_fp)
        t = int(msg.require_header("ComputeValidationShare").iteration)
        with job.lock, self._refusal_ends_job(job):
            digest = msg.digest()
            done = job.answered.get("validation")
            if done is not None and job.iteration == t:
                if done[0] == digest:
                    return cast(CipherVector, done[1])  # a retry: the same answer, never a second one
                raise FailedPrecondition(f"header.iteration: the validation share of iteration {t} was computed")
            total = len(job.expected)
            if job.x_val is None or not job.config.validation_due(t, total):
                raise FailedPrecondition(
                    f"header.iteration: iteration {t} is not a validation check of this job "
                    "(config.validation_every, and the end)"
                )
            if job.iteration != t or (t < total and job.phase == Phase.SHARES):
                raise FailedPrecondition(
                    f"header.iteration: the validation share of iteration {t} is available after that "
                    "iteration's residual shares, or after the last iteration"
                )
            best = msg.best_iteration
            if best is not None and best not in job.candidates:
                raise InvalidArgument(f"best_iteration: {best} is not a validation check of this job")
            a_val = msg.ciphers(job.active_key, "[[a_V]]_A")
            a_val.require_length(len(job.x_val), "[[a_V]]_A")
            with GATE.busy():
                share = steps.passive_loss_share(self.backend, a_val, job.x_val @ job.w, job.config.residual_model)
            job.candidates = {k: w for k, w in job.candidates.items() if k == best}
            job.candidates[t] = job.w.copy()
            job.answered["validation"] = (digest, share)
            if t == total:
                self._save_state(job)  # no step 5 follows to write it
            return share

    def finish_job(self, job_id: str, target_fp: bytes, aborted: bool, keep_iteration: int | None = None) -> bool:
        if job_id not in self._jobs and not aborted and self.models.exists(job_id):
            # A retried FinishJob: the shard is stored. Only the job's own
            # target key learns that, so the call is no oracle for model ids.
            if self.models.load(job_id).get("target_fingerprint") == target_fp.hex():
                return True
        if aborted and job_id not in self._jobs and self._release_unresumable(job_id, target_fp):
            return False
        job = self._job(job_id, target_fp)
        if aborted:
            self._end_job(job, "aborted by the active party")
            return False
        with job.lock:
            complete = job.iteration == len(job.expected)
            if not complete and job.iteration < self.policy.min_iterations:
                self._end_job(job, "finished before its schedule")
                raise FailedPrecondition(
                    f"header.iteration: the job ran {job.iteration} of its {len(job.expected)} iterations; the "
                    f"passive party stores a model only after its schedule, or after at least "
                    f"{self.policy.min_iterations} iterations (VFL_MIN_ITERATIONS at B)"
                )
            if keep_iteration is not None:
                if keep_iteration not in job.candidates:
                    self._end_job(job, "asked to keep weights it never checked")
                    raise FailedPrecondition(
                        f"keep_iteration: iteration {keep_iteration} is not a validation check whose weights "
                        "the passive party keeps"
                    )
                job.w = job.candidates[keep_iteration]
                job.kept_iteration = keep_iteration
            self._end_job(job, "finished")
            self._store_model(job)
        log.info("event=model_stored job=%s iterations=%d", job_id, job.iteration)
        return True

    def _store_model(self, job: PassiveJob) -> None:
        self.models.save(
            job.job_id,
            {
                "model_id": job.job_id,
                "role": "passive",
                "created_unix": time.time(),
                "config": job.config.model_dump(),
                "target_fingerprint": job.target_fp.hex(),
                "active_key": job.active_key.to_dict(),
                "peer": job.peer,
                "alignment_id": job.alignment_id,
                "population": sorted(job.population),
                "feature_names": self.data.feature_names,
                "weights": job.w.tolist(),
                "kept_iteration": job.kept_iteration,
                "initial_weights": job.w0.tolist(),
                "scaler": job.scaler.to_dict(),
                "dp": self._dp_record(job),
                "metrics": {
                    "iterations": job.iteration,
                    "last_update_sq_norm": job.last_update_sq_norm,
                    "restarts": job.restarts,
                    "dp_epsilon_spent": job.epsilon_spent(),
                    **metrics.since(job.clock_start),
                },
            },
        )

    def _dp_record(self, job: PassiveJob) -> dict[str, Any] | None:
        if not job.config.dp:
            return None
        return {
            "epsilon_target": job.config.dp_epsilon,
            "delta": job.config.dp_delta,
            "epsilon_spent": job.epsilon_spent(),
            "noise_multiplier": job.noise_multiplier,
            "clip_norm": job.clip_norm,
            "share_clip": self.policy.dp_share_clip,
            "active_clip_norm": job.active_clip_norm,
            "protects": "X_B from A (noise on z_A)",
            "sampling": "shuffled partition per epoch, batch rows known to both parties: no amplification",
        }

    # --- prediction -------------------------------------------------------

    @GATE.working
    def predict(
        self, model_id: str, target_fp: bytes, alignment_id: str, rows: list[int], msg: StepMessage, peer: str = ""
    ) -> CipherVector:
        """Prediction: [[u_A]]_A + [[u_B]]_A, re-randomised; only for the
        model's own peer, for rows of the model's alignment in its population
        (or, if B's policy allows any id, of any alignment this peer ran for
        the model), and within B's prediction budgets. No id travels: the
        rows are positions in an alignment both parties hold."""
        shard = self.models.load(check_job_id(model_id, "header.job_id"))
        if bytes.fromhex(shard["target_fingerprint"]) != target_fp:
            raise FailedPrecondition("header.target_fingerprint: not the target key this model was trained under")
        if shard.get("peer") != peer:
            raise NotFound(f"header.job_id: no model {model_id!r} for identity {peer!r} at the passive party")
        active_key = PublicKey.from_dict(shard["active_key"])
        if not rows:
            raise InvalidArgument("rows: expected at least one row")
        u_a_enc = msg.ciphers(active_key, "ciphertexts")
        u_a_enc.require_length(len(rows), "ciphertexts")
        alignment = self.alignments.load(alignment_id, peer)
        if alignment.alignment_id != shard.get("alignment_id") and not (
            alignment.purpose == "prediction" and alignment.model_id == model_id
        ):
            raise FailedPrecondition(
                f"alignment_id: alignment {alignment_id!r} is neither the model's nor one run to score with it"
            )
        ids = alignment.ids_at(rows, "rows")
        if self.policy.predict_scope == "population":
            population = set(shard.get("population", ()))
            outside = sum(1 for i in ids if i not in population)
            if outside:
                # Positions A itself knows to be outside the population: no membership answered.
                raise FailedPrecondition(
                    f"rows: {outside} of {len(rows)} rows are outside the model's population (its training and "
                    "holdout rows); the passive party scores only those (VFL_PREDICT_SCOPE at B)"
                )
        raw = self.data.features[self.data.positions(ids, "ids")]
        x = Scaler.from_dict(shard["scaler"]).transform(raw)
        record = shard.get("dp")
        if record:
            x = dp.clip_rows(x, float(record["clip_norm"]))
        u_b = x @ np.asarray(shard["weights"])
        if record:
            share_clip = 4.0 * float(record["share_clip"])
            u_b = np.clip(u_b, -share_clip, share_clip)
        # Charged (on disk) before the scores leave B.
        self.budget.charge(peer, model_id, len(rows))
        return steps.target_prediction_data(self.backend, u_a_enc, u_b)
