"""A's side: key exchange, job set-up, the training loop (one call per step
of PROTOCOL.md), the stored model and prediction. Plain domain code: the
servicer in `servicer.py` only decodes and encodes."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfl.common import dp, evaluation, metrics, serde
from vfl.common.alignments import AlignmentRecord, AlignmentStore
from vfl.common.checkpoint import JobCheckpoints, unusable_reason
from vfl.common.crypto.backend import CipherVector, HEBackend, PrivateKey, PublicKey, target_fingerprint
from vfl.common.crypto.pool import GATE
from vfl.common.data import PartyData, Scaler, check_ids
from vfl.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PeerError,
    Unavailable,
    VflError,
)
from vfl.common.jobconfig import JobConfig
from vfl.common.metrics import CLOCK
from vfl.common.models import ModelStore, check_job_id
from vfl.common.oserrors import owned_by
from vfl.common.protocol import steps
from vfl.common.protocol.batching import Batch, BatchSchedule, batch_schedule, check_batch_size, min_batch_size
from vfl.common.protocol.optimizers import (
    OptimizerSettings,
    OptimizerState,
    restored_state,
)
from vfl.common.protocol.phases import Phase
from vfl.common.protocol.residual import residual_model
from vfl.services.active import coalition
from vfl.services.active.alignment import ActiveAlignments
from vfl.services.active.jobs import JobCancelled, State, TrainingJob
from vfl.services.active.peer import PassiveClient
from vfl.services.active.records import ActiveSetup, ActiveState

log = logging.getLogger("vfl.active")

MAX_PREDICT_IDS = 100_000
ABORT_PATIENCE_S = 10.0
# How long CancelJob waits for the job to stop (one iteration, or a wait
# for a peer that is down, which checks every few seconds at most).
CANCEL_WAIT_S = 60.0


@dataclass
class _Session:
    """What one job's loop needs besides the job record."""

    job: TrainingJob
    passive_key: PublicKey
    target_fp: bytes
    x: np.ndarray  # [X_A standardised (under DP, clipped), 1] on the training rows
    y: np.ndarray
    scaler: Scaler
    w: np.ndarray  # w_A with the intercept last
    w0: np.ndarray  # A's own initial weights, from its CSPRNG
    batches: BatchSchedule
    p_passive: int
    train_ids: list[str]
    holdout_ids: list[str]
    dp: DpTerms | None
    alignment_id: str = ""
    scores_any_row: bool = False  # B's VFL_PREDICT_SCOPE=any, as SetupJob answered
    clock_start: dict[str, Any] = field(default_factory=CLOCK.snapshot)
    # Resumption: the iteration to run next, w before the last own update, and
    # B's step 5 of the previous iteration while it is not confirmed.
    next_iteration: int = 0
    prev_w: np.ndarray | None = None
    # A's own optimiser state (never sent), now and before the last update.
    optimizer: OptimizerState | None = None
    prev_optimizer: OptimizerState | None = None
    # Validation (config.validation_every): A's holdout rows [X_A, 1] with the
    # training statistics, their labels, and the best check so far.
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    best_loss: float | None = None
    best_w: np.ndarray | None = None
    stale_checks: int = 0  # checks since the best one
    sent_validation: tuple[int, CipherVector] | None = None
    validated_at: int = -1  # the last iteration checked in this process
    pending_z_b: list[int] | None = None
    # The requests of the current iteration, re-sent as they were on a retry
    # (B replays its answer instead of computing with fresh randomness).
    sent_shares: tuple[int, CipherVector] | None = None
    sent_gradient: tuple[int, tuple[int, ...], steps.MaskedGradient] | None = None
    # Under DP: the last iteration whose z_B A released, and how many
    # iterations it released twice (after a restart).
    released_at: int = -1
    extra_releases: int = 0

    def epsilon_spent(self) -> float | None:
        if self.dp is None:
            return None
        return dp.epsilon_so_far(
            self.dp.multiplier, self.job.config.dp_delta, self.released_at, self.batches.per_epoch, self.extra_releases
        )


@dataclass(frozen=True)
class DpTerms:
    """A job's differential privacy, as both parties derive it: the noise
    multiplier from (epsilon, delta) and the releases per row, and the
    norms each party stated."""

    multiplier: float
    clip_norm: float  # C_A: A's rows
    passive_clip_norm: float  # C_B: B's rows
    passive_share_clip: float  # bound on |b_i|

    @property
    def noise_std(self) -> float:
        """A's noise on z_B: one label moves X_B^T a by at most C_B."""
        return self.multiplier * dp.label_sensitivity(self.passive_clip_norm)

    @property
    def passive_noise_std(self) -> float:
        """B's noise on z_A: one row of X_B moves [X_A, 1]^T b by at most
        2 |b|_max sqrt(C_A^2 + 1)."""
        return self.multiplier * 2.0 * self.passive_share_clip * float(np.sqrt(self.clip_norm**2 + 1.0))

    def to_dict(self) -> dict[str, float]:
        return {
            "multiplier": self.multiplier,
            "clip_norm": self.clip_norm,
            "passive_clip_norm": self.passive_clip_norm,
            "passive_share_clip": self.passive_share_clip,
        }


class ActiveParty:
    def __init__(
        self,
        data: PartyData,
        key: PrivateKey,
        backend: HEBackend,
        data_dir: Path,
        peer: PassiveClient,
        min_peer_bits: int,
        recovery_s: float = 120.0,
        dp_clip_norm: float = 0.0,
        test_weights_seed: int | None = None,
        parties: Mapping[str, PassiveClient] | None = None,
    ) -> None:
        """`parties`: several passive parties by name (VFL_PEERS; `peer` is
        then unused): their jobs run in coalition.py."""
        if data.labels is None:
            raise InvalidArgument("active party data: expected a label column")
        self.data = data
        self.labels: np.ndarray = data.labels
        self.key = key
        self.backend = backend
        self.models = ModelStore(data_dir)
        self.parties = dict(parties or {})
        self.alignments = ActiveAlignments(
            data,
            AlignmentStore(data_dir),
            peer,
            recovery_s,
            running_dir=data_dir / "alignments-running",
            parties=self.parties,
        )
        self.running = coalition.RunningMarkers(data_dir)
        self.peer = peer
        # Calls to B that overlap A's own work (loss share, B's step 5).
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="active-io")
        self.min_peer_bits = min_peer_bits
        self.checkpoints = JobCheckpoints(data_dir)
        self.recovery_s = recovery_s
        self.test_weights_seed = test_weights_seed
        # Under DP: the norm A clips its standardised rows to (0 = sqrt(p_A)).
        self.dp_clip_norm = dp_clip_norm or dp.default_clip_norm(data.n_features)
        self._jobs: dict[str, TrainingJob] = {}
        self._reserved: set[str] = set()  # ids of jobs still in set-up
        self._lock = threading.Lock()

    # --- client API -----------------------------------------------------

    def start_training(
        self,
        job_id: str,
        config: JobConfig,
        train_ids: list[str],
        holdout_ids: list[str] | None = None,
        alignment_id: str = "",
    ) -> TrainingJob:
        """Key exchange and job set-up run here, so their errors reach the
        caller; the iterations run in a background thread. The rows are ids
        of the alignment; B receives their positions in it, never the ids."""
        job_id = check_job_id(job_id) if job_id else f"job-{uuid.uuid4().hex[:12]}"
        if not alignment_id:
            raise InvalidArgument("alignment_id: required; align the parties' ids first (StartAlignment, vfl align)")
        alignment = self.alignments.record(alignment_id)
        if alignment.purpose != "training":
            raise FailedPrecondition(f"alignment_id: alignment {alignment_id!r} is for prediction, not training")
        holdout = list(holdout_ids or [])
        if holdout:
            check_ids(holdout, "holdout_ids")
        holdout_rows = alignment.positions(holdout, "holdout_ids")
        if train_ids:
            ids = list(train_ids)
            check_ids(ids, "train_ids")
        else:
            held = set(holdout)
            ids = [i for i in alignment.ids if i not in held]
            if not ids:
                raise InvalidArgument(
                    f"alignment_id: alignment {alignment_id!r} holds {alignment.size} ids in the intersection, "
                    "none to train on besides the holdout ids"
                )
        if set(ids) & set(holdout):
            raise InvalidArgument("holdout_ids: an id is also a training id")
        rows = alignment.positions(ids, "train_ids")
        positions = self.data.positions(ids, "train_ids")
        if config.validation_every and not holdout:
            raise InvalidArgument("config.validation_every: needs holdout_ids, the rows A validates on")
        labelled = (
            np.r_[positions, self.data.positions(holdout, "holdout_ids")] if config.validation_every else positions
        )
        if config.model == "logistic" and not np.all((self.labels[labelled] == 0) | (self.labels[labelled] == 1)):
            raise FailedPrecondition(
                "config.model: logistic regression needs 0/1 labels, and the training (or validation) rows' "
                "labels hold other values (model linear fits them as numbers)"
            )
        p_a = self.data.n_features
        # Several passive parties, or the polynomial residual (its step 0 is
        # a session step): the protocol sessions run the job (coalition.py).
        in_session = bool(self.parties) or config.residual == "poly5"
        if in_session:
            coalition.refuse_unserved(config, len(self._session_parties()))
        with self._lock:
            if job_id in self._jobs or job_id in self._reserved or self.models.exists(job_id):
                raise AlreadyExists(f"job_id: job {job_id!r} already exists")
            # Reserve the id before the slow set-up.
            self._reserved.add(job_id)
        if in_session:
            return self._start_with_parties(job_id, config, ids, holdout, positions, alignment, rows, holdout_rows)
        passive_set_up = False
        target_fp = b""
        try:
            passive_key, target_fp = self._exchange_keys()
            clip = self.dp_clip_norm if config.dp else 0.0
            # From here B may hold the job, even if the connection loses its answer.
            passive_set_up = True
            reply = self.peer.setup_job(job_id, config, target_fp, p_a, alignment_id, rows, holdout_rows, clip)
            p_b = reply.passive_features
            check_batch_size(config.batch_size, p_a, p_b, config.allow_small_batch)
            floor = min_batch_size(p_a, p_b, config.allow_small_batch)
            batches = batch_schedule(
                len(ids), config.batch_size, config.epochs, config.seed, floor, config.max_iterations
            )
            job = TrainingJob(job_id, config, total=len(batches))
            w0 = steps.initial_weights(self.test_weights_seed, job_id, p_a + 1, config.init_scale)
            terms = self._dp_terms(config, batches, reply.passive_clip_norm, reply.passive_share_clip)
            session = self._session(job, ids, holdout, positions, batches, passive_key, target_fp, p_b, w0, w0, terms)
            session.alignment_id, session.scores_any_row = alignment_id, reply.scores_any_row
            job.dp_epsilon_spent = session.epsilon_spent()
            setup = ActiveSetup(
                job_id=job_id,
                config=config.model_dump(),
                train_ids=ids,
                holdout_ids=holdout,
                alignment_id=alignment_id,
                scores_any_row=reply.scores_any_row,
                target_fingerprint=target_fp,
                passive_key=passive_key.to_dict(),
                p_passive=p_b,
                started=job.started,
                w0=w0,
                dp=None if terms is None else terms.to_dict(),
            )
            self.checkpoints.save_setup(job_id, setup.to_record())
            self._save_state(session)
        except BaseException as exc:
            # Whatever failed (B's refusal, a lost answer, a full disk here), the
            # job leaves nothing behind: B releases it, A's files go, the id is
            # free. A refusal of SetupJob leaves nothing at B to release.
            if passive_set_up and not isinstance(exc, PeerError):
                self._abort_at_passive(job_id, target_fp)
            self.checkpoints.remove(job_id)
            with self._lock:
                self._reserved.discard(job_id)
            if isinstance(exc, VflError):
                raise owned_by("active", exc) from None
            raise
        with self._lock:
            self._reserved.discard(job_id)
            self._jobs[job_id] = job
        job.publish("started")
        log.info(
            "event=job_started job=%s rows=%d iterations=%d p_a=%d p_b=%d", job_id, len(ids), len(batches), p_a, p_b
        )
        threading.Thread(target=self._run, args=(session,), name=f"job-{job_id}", daemon=True).start()
        return job

    def _start_with_parties(
        self,
        job_id: str,
        config: JobConfig,
        ids: list[str],
        holdout: list[str],
        positions: np.ndarray,
        alignment: AlignmentRecord,
        rows: list[int],
        holdout_rows: list[int],
    ) -> TrainingJob:
        """StartTraining with several passive parties (coalition.py): set up
        here, so that refusals reach the caller; the iterations run in the
        background. Whatever fails in set-up, every party that may hold the
        job releases it and the id is free again."""
        p_a = self.data.n_features
        set_up: list[coalition.PartyLink] = []
        try:
            links = coalition.exchange_keys(self._session_parties(), self.key, self.backend, self.min_peer_bits)
            schedule = coalition.schedule_for(config, len(ids), p_a, links)
            self.running.save(job_id, links)
            any_row = coalition.set_up_at_parties(
                links, job_id, config, p_a, alignment, rows, holdout_rows, set_up.append
            )
        except BaseException as exc:
            refused_last = isinstance(exc, PeerError) and set_up
            coalition.release_at_parties(
                [(link.name, link.client, link.target_fp) for link in (set_up[:-1] if refused_last else set_up)],
                job_id,
                0,
            )
            self.running.remove(job_id)
            with self._lock:
                self._reserved.discard(job_id)
            if isinstance(exc, VflError):
                raise owned_by("active", exc) from None
            raise
        job = TrainingJob(job_id, config, total=len(schedule))
        with self._lock:
            self._reserved.discard(job_id)
            self._jobs[job_id] = job
        job.publish("started")
        log.info(
            "event=job_started job=%s rows=%d iterations=%d p_a=%d parties=%s",
            job_id,
            len(ids),
            len(schedule),
            p_a,
            ",".join(f"{link.name}:{link.features}" for link in links),
        )
        threading.Thread(
            target=self._run_with_parties,
            args=(job, links, ids, holdout, positions, schedule, alignment.alignment_id, any_row),
            name=f"job-{job_id}",
            daemon=True,
        ).start()
        return job

    def _run_with_parties(
        self,
        job: TrainingJob,
        links: list[coalition.PartyLink],
        ids: list[str],
        holdout: list[str],
        positions: np.ndarray,
        schedule: BatchSchedule,
        alignment_id: str,
        any_row: bool,
    ) -> None:
        config = job.config
        clock_start = CLOCK.snapshot()
        raw = self.data.features[positions]
        scaler = Scaler.fit(raw, config.standardize)
        x, y = steps.with_intercept(scaler.transform(raw)), self.labels[positions]
        w0 = steps.initial_weights(self.test_weights_seed, job.job_id, x.shape[1], config.init_scale)
        try:
            with ThreadPoolExecutor(max_workers=len(links), thread_name_prefix="active-parties") as pool:
                session = coalition.active_session(self.backend, self.key, job.job_id, config, x, y, w0, links, pool)
                coalition.run_iterations(job, session, schedule, self.recovery_s)
                job.raise_if_cancelled()  # the last chance: after FinishJob, each party has stored its shard
                coalition.finish_at_parties(links, job, job.iteration, self.recovery_s)
            self.models.save(
                job.job_id,
                {
                    "model_id": job.job_id,
                    "role": "active",
                    "created_unix": time.time(),
                    "config": config.model_dump(),
                    "target_fingerprint": "",  # one per party, in "parties"
                    "parties": coalition.parties_record(links),
                    "feature_names": self.data.feature_names,
                    "weights": session.w[:-1].tolist(),
                    "intercept": float(session.w[-1]),
                    "initial_weights": w0.tolist(),
                    "scaler": scaler.to_dict(),
                    "dp": None,
                    "holdout_rows": len(holdout),
                    "holdout_ids": list(holdout),
                    "alignment_id": alignment_id,
                    "population": sorted(set(ids) | set(holdout)),
                    "scores_any_row": any_row,
                    "active_features": self.data.n_features,
                    "passive_features": sum(link.features for link in links),
                    "train_rows": len(ids),
                    "metrics": {
                        "iterations": job.iteration,
                        "final_loss": job.loss,
                        "loss_history": job.losses,
                        "elapsed_s": time.time() - job.started,
                        "dp_epsilon_spent": None,
                        **metrics.since(clock_start),
                    },
                },
            )
            self.running.remove(job.job_id)
            self._evaluate_holdout(job, holdout)
            job.state = State.SUCCEEDED
            job.publish(f"model {job.job_id} stored")
            log.info("event=job_succeeded job=%s iterations=%d", job.job_id, job.iteration)
        except Exception as exc:  # noqa: BLE001 - the job fails, the service stays up
            _record_failure(job, exc)
            coalition.release_at_parties(
                [(link.name, link.client, link.target_fp) for link in links], job.job_id, job.iteration
            )
            self.running.remove(job.job_id)
            job.state = State.CANCELLED if isinstance(exc, JobCancelled) else State.FAILED
            job.publish(job.error)

    def resume_jobs(self) -> int:
        """Pick up the jobs that were running when this process stopped, each
        from its last checkpoint; they continue in the background once B
        answers. Returns how many. A job whose checkpoint is missing, damaged
        or unusable is registered as FAILED with the reason, and released at B
        (see _fail_unresumable). A job with several passive parties is not
        resumed: it is registered FAILED and released at every party."""
        resumed = 0
        coalition.fail_interrupted(self.running, self._session_parties(), self._register)
        for saved in self.checkpoints.load_all():
            if saved.missing == {"state"} and self.models.exists(saved.job_id):
                # Stopped between storing the model and removing the checkpoint: done.
                self.checkpoints.remove(saved.job_id)
                continue
            problem = saved.problem
            if not problem:
                assert saved.setup is not None and saved.state is not None
                try:
                    session = self._session_from_checkpoint(saved.setup, saved.state)
                except (KeyError, TypeError, ValueError, VflError) as exc:
                    why = unusable_reason(exc)
                    problem = f"job {saved.job_id}: its checkpoint cannot be used ({why}); the job cannot resume"
            if problem:
                self._fail_unresumable(saved.job_id, saved.setup, problem)
                continue
            with self._lock:
                self._jobs[session.job.job_id] = session.job
            session.job.publish("resumed after a restart")
            threading.Thread(
                target=self._resume, args=(session,), name=f"job-{session.job.job_id}", daemon=True
            ).start()
            resumed += 1
        return resumed

    def _fail_unresumable(self, job_id: str, setup: dict[str, Any] | None, problem: str) -> None:
        """A job A cannot resume: FAILED with `problem` for status calls and
        watchers at once; in the background, B is told to abort it (so that it
        releases its state and files) and A's remaining files are removed."""
        try:
            config = JobConfig.model_validate((setup or {})["config"])
        except (KeyError, TypeError, ValueError):
            config = JobConfig()
        job = TrainingJob(job_id, config, total=0, state=State.FAILED, error=problem)
        with self._lock:
            self._jobs[job_id] = job
        job.publish(problem)
        log.warning("event=job_failed job=%s error=%r", job_id, problem)
        target_fp: bytes | None = None
        try:
            target_fp = bytes.fromhex((setup or {})["target_fingerprint"])
        except (KeyError, TypeError, ValueError):
            pass  # the set-up is lost: the target key is found again by key exchange
        threading.Thread(
            target=self._release_unresumable, args=(job_id, target_fp), name=f"release-{job_id}", daemon=True
        ).start()

    def _release_unresumable(self, job_id: str, target_fp: bytes | None) -> None:
        deadline = time.monotonic() + self.recovery_s
        delay = 0.1
        try:
            while True:
                try:
                    if target_fp is None:
                        # The step header needs the target key: (pk_A, pk_B) again.
                        _, target_fp = self._exchange_keys()
                    self.peer.finish_job(serde.step_header(job_id, 0, target_fp), aborted=True)
                    log.info("event=job_released_at_passive job=%s", job_id)
                    return
                except Unavailable as exc:
                    if time.monotonic() > deadline:
                        log.warning("event=abort_not_delivered job=%s error=%r", job_id, str(exc))
                        return
                    time.sleep(delay)
                    delay = min(2.0, delay * 2)
                except VflError as exc:
                    # E.g. NOT_FOUND: B never had the job, or released it already.
                    log.warning("event=abort_not_delivered job=%s error=%r", job_id, str(exc))
                    return
        finally:
            self.checkpoints.remove(job_id)

    def _dp_terms(
        self, config: JobConfig, batches: BatchSchedule, passive_clip_norm: float, passive_share_clip: float
    ) -> DpTerms | None:
        if not config.dp:
            return None
        if not (passive_clip_norm > 0 and passive_share_clip > 0):
            raise FailedPrecondition("passive party: stated no clipping norm for a job with config.dp_epsilon")
        releases = dp.releases_per_row(len(batches), batches.per_epoch)
        multiplier = dp.noise_multiplier(config.dp_epsilon, config.dp_delta, releases)
        return DpTerms(multiplier, self.dp_clip_norm, passive_clip_norm, passive_share_clip)

    def _session(
        self,
        job: TrainingJob,
        ids: list[str],
        holdout: list[str],
        positions: np.ndarray,
        batches: BatchSchedule,
        passive_key: PublicKey,
        target_fp: bytes,
        p_passive: int,
        w: np.ndarray,
        w0: np.ndarray,
        terms: DpTerms | None,
    ) -> _Session:
        """A job's session: A's standardised (under DP, clipped) training
        rows (its own statistics), labels and schedule."""
        raw = self.data.features[positions]
        scaler = Scaler.fit(raw, job.config.standardize)
        x = scaler.transform(raw)
        if terms is not None:
            x = dp.clip_rows(x, terms.clip_norm)
        val_x = val_y = None
        if job.config.validation_every:
            held = self.data.positions(holdout, "holdout_ids")
            val_x, val_y = steps.with_intercept(scaler.transform(self.data.features[held])), self.labels[held]
        session = _Session(
            job=job,
            passive_key=passive_key,
            target_fp=target_fp,
            x=steps.with_intercept(x),
            y=self.labels[positions],
            scaler=scaler,
            w=w,
            w0=w0,
            batches=batches,
            p_passive=p_passive,
            train_ids=ids,
            holdout_ids=holdout,
            dp=terms,
        )
        session.val_x, session.val_y = val_x, val_y
        return session

    def _session_from_checkpoint(self, setup_record: dict[str, Any], state_record: dict[str, Any]) -> _Session:
        setup, state = ActiveSetup.from_record(setup_record), ActiveState.from_record(state_record)
        config = JobConfig.model_validate(setup.config)
        ids = setup.train_ids
        positions = self.data.positions(ids, "train_ids")
        p_b = setup.p_passive
        floor = min_batch_size(self.data.n_features, p_b, config.allow_small_batch)
        batches = batch_schedule(len(ids), config.batch_size, config.epochs, config.seed, floor, config.max_iterations)
        job = TrainingJob(setup.job_id, config, total=len(batches), started=setup.started)
        job.iteration = state.next_iteration
        job.epoch, job.loss, job.losses = state.epoch, state.loss, list(state.losses)
        passive_key = PublicKey.from_dict(setup.passive_key)
        if len(state.w) != len(setup.w0):
            raise ValueError("w: weights of another width")
        terms = None if setup.dp is None else DpTerms(**setup.dp)
        s = self._session(
            job,
            ids,
            setup.holdout_ids,
            positions,
            batches,
            passive_key,
            setup.target_fingerprint,
            p_b,
            state.w,
            setup.w0,
            terms,
        )
        s.alignment_id, s.scores_any_row = setup.alignment_id, setup.scores_any_row
        s.released_at, s.extra_releases = state.released_at, state.extra_releases
        job.dp_epsilon_spent = s.epsilon_spent()
        s.next_iteration = job.iteration
        s.prev_w = state.prev_w
        job.validation_losses = list(state.validation_losses)
        job.best_iteration = state.best_iteration
        s.best_loss, s.best_w, s.stale_checks = state.best_loss, state.best_w, state.stale_checks
        settings = OptimizerSettings.of(config)
        s.optimizer = restored_state(state.optimizer, settings, len(state.w), job.iteration)
        if s.prev_w is not None:
            s.prev_optimizer = restored_state(state.prev_optimizer, settings, len(state.w), job.iteration - 1)
        s.pending_z_b = state.pending_z_b
        return s

    def _resume(self, s: _Session) -> None:
        job = s.job
        try:
            deadline = time.monotonic() + self.recovery_s
            while True:
                try:
                    _, target_fp = self._exchange_keys()
                    break
                except Unavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            if target_fp != s.target_fp:
                raise FailedPrecondition(f"job {job.job_id}: the target key changed since the job started")
            self._recover(s, Unavailable("this party restarted"))
        except Exception as exc:  # noqa: BLE001 - the job fails, the service stays up
            job.error = (
                str(owned_by("active", exc)) if isinstance(exc, VflError) else f"internal error: {type(exc).__name__}"
            )
            log.warning("event=job_failed job=%s error=%r", job.job_id, job.error)
            self.checkpoints.remove(job.job_id)
            job.state = State.FAILED
            job.publish(job.error)
            return
        self._run(s)

    def _session_parties(self) -> dict[str, PassiveClient]:
        """The passive parties of a session job: VFL_PEERS, or the one peer."""
        return self.parties or {coalition.ONE_PASSIVE: self.peer}

    def _register(self, job: TrainingJob) -> None:
        with self._lock:
            self._jobs[job.job_id] = job

    def job(self, job_id: str) -> TrainingJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job_id: no job {job_id[:64]!r}")
        return job

    def jobs(self) -> list[TrainingJob]:
        """Every job this process knows, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.started)

    def cancel_job(self, job_id: str, wait_s: float = CANCEL_WAIT_S) -> TrainingJob:
        """Ask a running job to stop, and wait for it to end: it stops before
        its next iteration, tells every passive party to drop the job (each
        stores nothing and removes its checkpoint) and removes A's own."""
        job = self.job(job_id)
        if job.state != State.RUNNING:
            raise FailedPrecondition(f"job_id: job {job_id[:64]!r} already ended ({job.state.name.lower()})")
        job.cancel_requested.set()
        log.info("event=job_cancel_requested job=%s iteration=%d", job_id, job.iteration)
        if not job.ended(wait_s):
            raise Unavailable(f"job {job_id[:64]!r}: asked to stop, still running after {wait_s:.0f} s")
        return job

    def load_model(self, model_id: str) -> dict[str, Any]:
        return self.models.load(check_job_id(model_id, "model_id"))

    def _evaluate_holdout(self, job: TrainingJob, holdout_ids: list[str]) -> None:
        """AUC and KS of the stored model on the job's holdout rows (logistic
        models with both classes there), kept in the shard and the job record.
        A prediction like any other: B charges the ids to its budgets. If it
        cannot be scored the job still succeeds, without the figures."""
        if not holdout_ids or job.config.model != "logistic":
            return
        y = self.labels[self.data.positions(holdout_ids, "holdout_ids")]
        if len(np.unique(y)) < 2:
            return  # no AUC with one class: not worth a charge to B's budgets
        # The model is stored at every party by now: nothing here may fail the job.
        try:
            out = self.predict(job.job_id, holdout_ids)
            keep = out.scored
            if len(np.unique(y[keep])) < 2:
                return
            auc, ks = evaluation.auc_and_ks(y[keep], out.probabilities[keep])
            shard = self.models.load(job.job_id)
            shard["metrics"]["validation"] = {"auc": auc, "ks": ks, "rows": int(keep.sum())}
            self.models.save(job.job_id, shard)
        except Exception as exc:  # noqa: BLE001 - the figures are optional, the job has succeeded
            reason = str(exc) if isinstance(exc, VflError) else type(exc).__name__
            log.warning("event=holdout_not_scored job=%s error=%r", job.job_id, reason)
            return
        job.validation_auc, job.validation_ks = auc, ks
        log.info("event=holdout_scored job=%s rows=%d auc=%.4f ks=%.4f", job.job_id, int(keep.sum()), auc, ks)

    def list_models(self) -> list[dict[str, Any]]:
        """The readable shards; a damaged one is quarantined and logged, not listed."""
        return self.models.load_all()

    # --- the training loop ----------------------------------------------

    def _exchange_keys(self) -> tuple[PublicKey, bytes]:
        passive_key, their_fp = self.peer.exchange_keys(self.key.public, self.min_peer_bits)
        self.backend.require_scheme(passive_key, "passive_key")
        # Tables for the peer's key grow on first use anyway; growing them in
        # the background keeps key exchange off the job's critical path.
        self._io.submit(self.backend.prepare, passive_key)
        target_fp = target_fingerprint(self.key.public, passive_key)
        if their_fp != target_fp:
            raise FailedPrecondition("target_fingerprint: the passive party computed a different target key")
        return passive_key, target_fp

    def _abort_at_passive(self, job_id: str, target_fp: bytes, iteration: int = 0) -> None:
        """Best effort: B drops the job's state and stores nothing. Sent again
        for up to ABORT_PATIENCE_S while B cannot be reached: a job left at B
        holds its state and counts against A's quota there."""
        deadline = time.monotonic() + ABORT_PATIENCE_S
        delay = 0.1
        while True:
            try:
                self.peer.finish_job(serde.step_header(job_id, iteration, target_fp), aborted=True)
                return
            except Unavailable as exc:
                if time.monotonic() + delay > deadline:
                    log.warning("event=abort_not_delivered job=%s error=%r", job_id, str(exc))
                    return
                time.sleep(delay)
                delay = min(2.0, delay * 2)
            except VflError as exc:  # e.g. NOT_FOUND: B never had the job
                log.warning("event=abort_not_delivered job=%s error=%r", job_id, str(exc))
                return

    def _save_state(self, s: _Session) -> None:
        """Written before B's step 5 is sent: whatever happens next, A can
        resume either with B's update confirmed or by re-sending it."""
        self.checkpoints.save_state(s.job.job_id, self._state(s), durable=True)

    def _state(self, s: _Session) -> dict[str, Any]:
        job = s.job
        return ActiveState(
            next_iteration=s.next_iteration,
            w=s.w,
            prev_w=s.prev_w,
            optimizer=None if s.optimizer is None else s.optimizer.to_record(),
            prev_optimizer=None if s.prev_optimizer is None else s.prev_optimizer.to_record(),
            validation_losses=list(job.validation_losses),
            best_iteration=job.best_iteration,
            best_loss=s.best_loss,
            best_w=s.best_w,
            stale_checks=s.stale_checks,
            pending_z_b=s.pending_z_b,
            epoch=job.epoch,
            loss=job.loss,
            losses=list(job.losses),
            released_at=s.released_at,
            extra_releases=s.extra_releases,
        ).to_record()

    def _checkpoint_then_apply(self, job_id: str, state: dict[str, Any], header: Any, z_b: list[int]) -> float:
        # In A's background thread, in this order: the checkpoint, then B's
        # step 5. Durable: z_B is a decryption released to B, and after a power
        # cut A must neither forget it (B applied it) nor, under DP, release
        # the iteration again uncounted.
        self.checkpoints.save_state(job_id, state, durable=True)
        return self.peer.apply_gradient(header, self.key.public, z_b)

    def _run(self, s: _Session) -> None:
        job = s.job
        pending: Future[float] | None = None
        try:
            prev_loss: float | None = job.losses[-1][1] if job.losses else None
            while s.next_iteration < len(s.batches):
                job.raise_if_cancelled()
                t = s.next_iteration
                batch = s.batches[t]
                try:
                    loss, pending = self._train_iteration(s, t, batch, pending)
                except Unavailable as exc:
                    pending = None
                    self._recover(s, exc)
                    continue
                job.iteration, job.epoch = t + 1, batch.epoch
                message = ""
                if loss is not None:
                    job.loss = loss
                    job.losses.append((t + 1, loss))
                    if job.config.tol > 0 and prev_loss is not None and abs(loss - prev_loss) < job.config.tol:
                        message = f"early stop: loss change {abs(loss - prev_loss):.3g} < tol {job.config.tol:g}"
                    prev_loss = loss
                # Every iteration at DEBUG; at INFO every tenth (a log line per
                # step costs the training loop about a millisecond).
                level = logging.INFO if (t + 1) % 10 == 0 or t + 1 == len(s.batches) else logging.DEBUG
                log.log(
                    level, "event=iteration job=%s iteration=%d epoch=%d loss=%s", job.job_id, t + 1, batch.epoch, loss
                )
                patience = job.config.patience
                if not message and patience and s.stale_checks >= patience:
                    message = (
                        f"early stop: no better validation loss in {patience} checks; "
                        f"keeping iteration {job.best_iteration}"
                    )
                if message:
                    job.publish(message)
                    break
                job.publish()
            while True:
                try:
                    if pending is not None:
                        pending.result()
                        pending, s.pending_z_b = None, None
                    elif s.pending_z_b is not None:
                        self._resend_apply(s)
                    break
                except Unavailable as exc:
                    pending = None
                    self._recover(s, exc)
            while job.config.validation_due(job.iteration, len(s.batches)) and job.iteration == len(s.batches):
                try:
                    self._validation_check(s, job.iteration)  # the final weights: after B's last step 5
                    break
                except Unavailable as exc:
                    self._recover(s, exc)
            job.raise_if_cancelled()  # the last chance: after FinishJob, B has stored its shard
            if s.best_w is not None:
                s.w = s.best_w  # the best check's weights, as B keeps its own
                job.publish(f"validation: keeping iteration {job.best_iteration} (loss {s.best_loss:.6g})")
            self._finish_at_passive(s)
            self._store_model(s)
            self.checkpoints.remove(job.job_id)
            self._evaluate_holdout(job, s.holdout_ids)
            job.state = State.SUCCEEDED
            job.publish(f"model {job.job_id} stored")
            log.info(
                "event=job_succeeded job=%s iterations=%d elapsed_s=%.2f",
                job.job_id,
                job.iteration,
                time.time() - job.started,
            )
        except Exception as exc:  # noqa: BLE001 - the job fails, the service stays up
            _record_failure(job, exc)
            if pending is not None:
                futures.wait([pending])  # B finishes the last step before it hears of the abort
            self._abort_at_passive(job.job_id, s.target_fp, job.iteration)
            self.checkpoints.remove(job.job_id)
            job.state = State.CANCELLED if isinstance(exc, JobCancelled) else State.FAILED
            job.publish(job.error)

    def _finish_at_passive(self, s: _Session) -> None:
        """FinishJob, sent again while B cannot be reached (for recovery_s): B
        answers a repeated FinishJob from the shard it stored. Not _recover:
        once B has stored its shard it runs the job no more, and GetJobState
        would answer that there is no such job."""
        job = s.job
        header = serde.step_header(job.job_id, job.iteration, s.target_fp)
        deadline = time.monotonic() + self.recovery_s
        delay = 0.1
        while True:
            try:
                self.peer.finish_job(header, aborted=False, keep_iteration=job.best_iteration)
                return
            except Unavailable as exc:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"job {job.job_id}: the passive party did not confirm FinishJob within "
                        f"{self.recovery_s:.0f} s: {exc}"
                    ) from None
                log.warning("event=peer_lost job=%s iteration=%d error=%r", job.job_id, job.iteration, str(exc))
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    def _resend_apply(self, s: _Session) -> None:
        """B's step 5 of the previous iteration, re-sent byte for byte."""
        assert s.pending_z_b is not None
        t = s.next_iteration - 1
        self.peer.apply_gradient(serde.step_header(s.job.job_id, t, s.target_fp), self.key.public, s.pending_z_b)
        s.pending_z_b = None

    def _recover(self, s: _Session, cause: Exception) -> None:
        """B (or the assistant) failed mid-iteration: wait for it to answer
        again, ask where the job stands at B, and line A up with it. Gives up
        (the job fails) after recovery_s seconds without an answer."""
        job = s.job
        log.warning("event=peer_lost job=%s iteration=%d error=%r", job.job_id, s.next_iteration, str(cause))
        deadline = time.monotonic() + self.recovery_s
        delay = 0.1
        while True:
            job.raise_if_cancelled()
            try:
                # All of it again if the connection breaks anew, re-sent step 5 included.
                self._line_up(s)
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"job {job.job_id}: the passive party did not come back within {self.recovery_s:.0f} s"
                    ) from None
                time.sleep(delay)
                delay = min(2.0, delay * 2)
        log.info("event=job_resumed job=%s iteration=%d", job.job_id, s.next_iteration)

    def _line_up(self, s: _Session) -> None:
        """Ask where the job stands at B and line A up with it. Repeatable: B's
        step 5 stays pending until B has confirmed it."""
        job = s.job
        header = serde.step_header(job.job_id, s.next_iteration, s.target_fp)
        b_iteration, b_phase = self.peer.job_state(header)
        t = s.next_iteration
        if s.pending_z_b is not None:
            # A has applied iteration t-1; B's step 5 of it is not confirmed.
            if b_iteration == t:
                s.pending_z_b = None  # B applied it; only the reply was lost
            elif b_iteration == t - 1 and b_phase == Phase.APPLY:
                self._resend_apply(s)
            elif b_iteration == t - 1 and s.prev_w is not None:
                # B lost that iteration's state (it restarted): both redo it.
                s.w, s.prev_w, s.pending_z_b, s.next_iteration = s.prev_w, None, None, t - 1
                s.optimizer, s.prev_optimizer = s.prev_optimizer, None
            else:
                raise FailedPrecondition(f"job {job.job_id}: B is at iteration {b_iteration}, A at {t}")
        elif b_iteration != t:
            raise FailedPrecondition(f"job {job.job_id}: B is at iteration {b_iteration}, A at {t}")

    def _validation_check(self, s: _Session, t: int) -> None:
        """Validation (config.validation_every): the loss of w^t on the
        holdout rows, from A's own terms and B's share under A's key, as the
        loss check; the best check's weights are the ones both parties keep."""
        job = s.job
        if s.validated_at == t or s.val_x is None or s.val_y is None:
            return  # a retried iteration: checked already
        u_val = s.val_x @ s.w
        if s.sent_validation is not None and s.sent_validation[0] == t:
            a_val = s.sent_validation[1]  # re-sent as it was: B answers a retry by replay
        else:
            a_val = steps.encrypt_share(
                self.backend, self.key.public, job.config.residual_model.active_share(u_val, s.val_y)
            )
            s.sent_validation = (t, a_val)
        # The best so far, which B keeps; never this check itself (redone after
        # B lost an iteration, it is still the best, and B keeps it anew).
        best = job.best_iteration if job.best_iteration is not None and job.best_iteration < t else None
        header = serde.step_header(job.job_id, t, s.target_fp)
        share = self.peer.validation_share(header, best, a_val, self.key.public)
        loss = steps.active_loss(u_val, s.val_y, share, self.backend, self.key, job.config.residual_model)
        s.validated_at = t
        job.validation_losses = [(i, v) for i, v in job.validation_losses if i != t] + [(t, loss)]
        if job.best_iteration == t or s.best_loss is None or loss < s.best_loss:
            s.best_loss, s.best_w, job.best_iteration, s.stale_checks = loss, s.w.copy(), t, 0
        else:
            s.stale_checks += 1
        log.info("event=validation job=%s iteration=%d loss=%.6g best=%s", job.job_id, t, loss, job.best_iteration)

    @GATE.working
    def _train_iteration(
        self, s: _Session, t: int, batch: Batch, previous_apply: Future[float] | None
    ) -> tuple[float | None, Future[float]]:
        """One iteration of PROTOCOL.md on batch S. Returns the batch loss when
        checked, and B's step 5 still in flight: it overlaps A's own step 5 and
        the next iteration's encryption, and completes before the next step 1."""
        header = serde.step_header(s.job.job_id, t, s.target_fp)
        x, y = s.x[batch.rows], s.y[batch.rows]
        u_a = x @ s.w
        a = steps.active_residual_share(x, s.w, y, s.job.config.residual_model)
        # Steps 1-2: send [[a_S]]_A, receive [[b_S]]_B. A retried iteration
        # re-sends the same ciphertexts, which B answers by replay.
        if s.sent_shares is not None and s.sent_shares[0] == t:
            a_enc = s.sent_shares[1]
        else:
            a_enc = steps.first_encrypted_data(self.backend, self.key.public, a)
            s.sent_shares = (t, a_enc)
        if previous_apply is not None:
            previous_apply.result()
            s.pending_z_b = None
        reply = self.peer.exchange_residual_shares(header, batch.rows.tolist(), a_enc, s.passive_key.cipher_width)
        b_enc = reply.ciphers(s.passive_key, "[[b_S]]_B")
        b_enc.require_length(len(batch.rows), "[[b_S]]_B")
        if s.job.config.validation_due(t, len(s.batches)):
            self._validation_check(s, t)  # w^t at both parties: after step 2, before either's step 5
        every = s.job.config.loss_every
        want_loss = bool(every) and ((t + 1) % every == 0 or t + 1 == len(s.batches))
        # B computes the loss share beside its step 3; fetch it while A computes.
        loss_share = self._io.submit(self.peer.loss_share, header, self.key.public) if want_loss else None
        # Step 3: [[X_A^T b + R_A]]_B (the same one again if B replayed [[b_S]]_B).
        if s.sent_gradient is not None and s.sent_gradient[:2] == (t, b_enc.values):
            grad_a = s.sent_gradient[2]
        else:
            grad_a = steps.masked_encrypted_gradient(self.backend, x, b_enc)
            s.sent_gradient = (t, b_enc.values, grad_a)
        # Step 4: B decrypts ours; we decrypt B's.
        width = max(s.passive_key.residue_width, self.key.public.cipher_width)
        reply = self.peer.exchange_masked_gradients(
            header, grad_a.ciphers, max(len(grad_a.ciphers), s.p_passive), width
        )
        z_a = reply.residues(s.passive_key, "z_A")
        grad_b = reply.ciphers(self.key.public, "[[h_B + R_B]]_A")
        z_b = steps.decrypt_masked_gradient(self.backend, self.key, grad_b, s.p_passive)
        if s.dp is not None:
            # The decrypting party adds the noise (protecting y from B); a
            # restarted iteration releases again, with fresh noise, and counts.
            z_b = steps.add_release_noise(self.key, z_b, dp.gaussian_noise(s.dp.noise_std, len(z_b)))
            if t <= s.released_at:
                s.extra_releases += 1
            s.released_at = max(s.released_at, t)
            s.job.dp_epsilon_spent = s.epsilon_spent()
        loss = None
        if loss_share is not None:
            loss = steps.active_loss(u_a, y, loss_share.result(), self.backend, self.key, s.job.config.residual_model)
        # Step 5 at A: remove R_A, add X_A^T a, update w_A; checkpoint; then
        # B's step 5, in flight while A starts the next iteration.
        noise_std = 0.0 if s.dp is None else s.dp.passive_noise_std
        new_w, new_state = steps.update_own_weights(
            [steps.Decryption(z_a, grad_a.mask, s.passive_key)],
            x,
            a,
            s.w,
            penalised=np.r_[np.ones(len(s.w) - 1), 0.0],  # not the intercept
            l2=s.job.config.l2,
            noise_std=noise_std,
            optimizer=OptimizerSettings.of(s.job.config),
            state=s.optimizer,
        )
        s.prev_w, s.w = s.w, new_w
        s.prev_optimizer, s.optimizer = s.optimizer, new_state
        s.next_iteration, s.pending_z_b = t + 1, z_b
        s.sent_shares = s.sent_gradient = None
        apply = self._io.submit(self._checkpoint_then_apply, s.job.job_id, self._state(s), header, z_b)
        return loss, apply

    def _store_model(self, s: _Session) -> None:
        job = s.job
        self.models.save(
            job.job_id,
            {
                "model_id": job.job_id,
                "role": "active",
                "created_unix": time.time(),
                "config": job.config.model_dump(),
                "target_fingerprint": s.target_fp.hex(),
                "passive_key": s.passive_key.to_dict(),
                "feature_names": self.data.feature_names,
                "weights": s.w[:-1].tolist(),
                "intercept": float(s.w[-1]),
                "kept_iteration": job.best_iteration,
                "validation_losses": list(job.validation_losses),
                "initial_weights": s.w0.tolist(),
                "scaler": s.scaler.to_dict(),
                "dp": self._dp_record(s),
                "holdout_rows": len(s.holdout_ids),
                "holdout_ids": list(s.holdout_ids),
                "alignment_id": s.alignment_id,
                "population": sorted(set(s.train_ids) | set(s.holdout_ids)),
                "scores_any_row": s.scores_any_row,
                "active_features": self.data.n_features,
                "passive_features": s.p_passive,
                "train_rows": len(s.train_ids),
                "metrics": {
                    "iterations": job.iteration,
                    "final_loss": job.loss,
                    "loss_history": job.losses,
                    "elapsed_s": time.time() - job.started,
                    "dp_epsilon_spent": s.epsilon_spent(),
                    **metrics.since(s.clock_start),
                },
            },
        )

    @staticmethod
    def _dp_record(s: _Session) -> dict[str, Any] | None:
        if s.dp is None:
            return None
        return {
            "epsilon_target": s.job.config.dp_epsilon,
            "delta": s.job.config.dp_delta,
            "epsilon_spent": s.epsilon_spent(),
            "noise_multiplier": s.dp.multiplier,
            **s.dp.to_dict(),
            "protects": "y from B (noise on z_B)",
            "sampling": "shuffled partition per epoch, batch rows known to both parties: no amplification",
        }

    # --- prediction -----------------------------------------------------

    def predict(self, model_id: str, ids: list[str], align_new_ids: bool = False) -> Prediction:
        """P(y=1) for ids: send [[u_A]]_A, receive [[u_A + u_B]]_A, decrypt.
        B receives positions in an alignment, never ids: the model's own
        alignment, or (align_new_ids) one A runs now for the ids outside it.
        An id B holds no scorable row for is answered NOT_AT_PASSIVE."""
        shard = self.models.load(check_job_id(model_id, "model_id"))
        check_ids(ids, "ids")
        if len(ids) > MAX_PREDICT_IDS:
            raise InvalidArgument(f"ids: at most {MAX_PREDICT_IDS} per call, got {len(ids)}")
        own = self.data.positions(ids, "ids")  # A's own data
        alignment = self.alignments.record(str(shard.get("alignment_id", "")), "model's alignment_id")
        index = alignment.index()
        any_row = bool(shard.get("scores_any_row"))
        population = set(shard.get("population", ()))
        # (alignment, [(request index, position in that alignment)])
        groups = [(alignment, [(k, index[x]) for k, x in enumerate(ids) if x in index])]
        if not any_row:
            groups[0] = (alignment, [(k, r) for k, r in groups[0][1] if ids[k] in population])
        new = [k for k, x in enumerate(ids) if x not in index]
        if new and align_new_ids and any_row:
            extra = self.alignments.run_now([ids[k] for k in new], "prediction", model_id)
            extra_index = extra.index()
            groups.append((extra, [(k, extra_index[ids[k]]) for k in new if ids[k] in extra_index]))
        x = Scaler.from_dict(shard["scaler"]).transform(self.data.features[own])
        if shard.get("dp"):
            x = dp.clip_rows(x, float(shard["dp"]["clip_norm"]))
        u_a = x @ np.asarray(shard["weights"]) + float(shard["intercept"])
        probs = np.full(len(ids), np.nan)
        scored = np.zeros(len(ids), dtype=bool)
        for record, pairs in groups:
            if not pairs:
                continue
            at = np.asarray([k for k, _ in pairs], dtype=np.int64)
            if "parties" in shard:
                part = coalition.predict_with_parties(
                    self.backend,
                    self.key,
                    shard,
                    self._session_parties(),
                    u_a[at],
                    record,
                    [r for _, r in pairs],
                    model_id,
                )
            else:
                part = self._two_party_scores(shard, model_id, record.alignment_id, [r for _, r in pairs], u_a[at])
            if not np.all(np.isfinite(part)):
                raise FailedPrecondition("prediction: the decrypted scores are not finite")
            probs[at], scored[at] = part, True
        return Prediction(probs, scored)

    def _two_party_scores(
        self, shard: dict[str, Any], model_id: str, alignment_id: str, rows: list[int], u_a: np.ndarray
    ) -> np.ndarray:
        """[[u_A]]_A to B with B's positions, [[u_A + u_B]]_A back, decrypted."""
        passive_key = PublicKey.from_dict(shard["passive_key"])
        target_fp = target_fingerprint(self.key.public, passive_key)
        if target_fp.hex() != shard["target_fingerprint"]:
            raise FailedPrecondition("model_id: the model was trained under another key of this party")
        model = residual_model(str(shard["config"].get("model", "logistic")))
        enc = steps.third_encrypted_data(self.backend, self.key.public, u_a)
        header = serde.step_header(model_id, 0, target_fp)
        reply = self.peer.predict_scores(header, alignment_id, rows, enc)
        scores = reply.ciphers(self.key.public, "[[u_A + u_B]]_A")
        return steps.decrypt_prediction(self.backend, self.key, scores, len(u_a), model)


def _record_failure(job: TrainingJob, exc: Exception) -> None:
    """The job's error, one line a caller may read (no secret: a domain
    error's message, or only the type of a bug), logged."""
    if isinstance(exc, JobCancelled):
        job.error = str(exc)
        log.info("event=job_cancelled job=%s iteration=%d", job.job_id, job.iteration)
        return
    job.error = str(owned_by("active", exc)) if isinstance(exc, VflError) else f"internal error: {type(exc).__name__}"
    log.warning("event=job_failed job=%s iteration=%d error=%r", job.job_id, job.iteration, job.error)
    if not isinstance(exc, VflError):
        log.exception("event=job_internal_error job=%s", job.job_id)


@dataclass(frozen=True)
class Prediction:
    """Probabilities per requested id; NaN where `scored` is False (B holds
    no row it scores for that id)."""

    probabilities: np.ndarray
    scored: np.ndarray


def final_loss(shard: dict[str, Any]) -> float | None:
    value = shard["metrics"].get("final_loss")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
