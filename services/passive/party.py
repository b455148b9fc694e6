"""B's half of every step, as plain domain code (no gRPC).

A job is a small state machine: for iteration t B accepts, in order, the
residual shares (steps 1-2), the masked gradients (steps 3-4) and the
unmasked gradient (step 5), each once. Decryption for A happens only in the
masked-gradient step, once per iteration, for a vector of exactly p_A + 1
ciphertexts under sk_B: B is a decryption oracle for nothing else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, cast

import numpy as np

from common import metrics
from common.checkpoint import JobCheckpoints
from common.crypto.backend import CipherVector, HEBackend, PrivateKey, PublicKey, target_fingerprint
from common.crypto.pool import GATE
from common.data import PartyData, Scaler
from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, VflError
from common.jobconfig import JobConfig
from common.metrics import CLOCK
from common.models import ModelStore, check_job_id
from common.protocol import steps
from common.protocol.batching import Batch, batch_schedule, check_batch_size, min_batch_size
from common.protocol.reference import initial_weights
from common.serde import StepMessage, rows_array

log = logging.getLogger("vfl.passive")

# Restarts of an iteration that B allows per job (see _restart_iteration).
MAX_RESTARTS = 3
# How long a loss share waits for step 4 before it is computed regardless.
LOSS_WAIT_S = 1.0


class Phase(Enum):
    SHARES = "residual shares"
    GRADIENTS = "masked gradients"
    APPLY = "apply gradient"


@dataclass
class PassiveJob:
    job_id: str
    config: JobConfig
    target_fp: bytes
    active_key: PublicKey
    active_features: int
    x: np.ndarray  # standardised training rows, in the job's id order
    scaler: Scaler
    w: np.ndarray
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
    # Replay of retried steps: this iteration's answers by request digest, and
    # the last step 5 (kept across B's restart in the checkpoint).
    answered: dict[str, tuple[bytes, Any]] = field(default_factory=dict)
    last_apply: tuple[int, bytes, float] | None = None
    restarts: int = 0
    restarted_at: int = -1
    lock: threading.Lock = field(default_factory=threading.Lock)
    clock_start: dict[str, Any] = field(default_factory=CLOCK.snapshot)

    def replay(self, iteration: int, step: str, digest: bytes) -> Any | None:
        """The answer already given to this very request in this iteration."""
        if iteration == self.iteration and step in self.answered and self.answered[step][0] == digest:
            log.info("event=step_replayed job=%s iteration=%d step=%s", self.job_id, iteration, step)
            return self.answered[step][1]
        return None

    def expect(self, iteration: int, phase: Phase) -> None:
        if iteration != self.iteration or phase != self.phase:
            raise FailedPrecondition(
                f"header.iteration: job {self.job_id!r} expects {self.phase.value} of iteration "
                f"{self.iteration}, got {phase.value} of iteration {iteration}"
            )


class PassiveParty:
    def __init__(self, data: PartyData, key: PrivateKey, backend: HEBackend, data_dir: Path) -> None:
        self.data = data
        self.key = key
        self.backend = backend
        self.models = ModelStore(data_dir)
        self.checkpoints = JobCheckpoints(data_dir)
        self._targets: dict[bytes, PublicKey] = {}
        self._jobs: dict[str, PassiveJob] = {}
        self._lock = threading.Lock()
        # Overlaps B's X_B^T [[a]] with A's X_A^T [[b]] (both step 3).
        # One thread each, so that no task waits behind another: B's own
        # step-3 product, the next batch's share, and the loss share (which
        # waits for step 4).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="passive-step3")
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="passive-ahead")
        self._loss = ThreadPoolExecutor(max_workers=4, thread_name_prefix="passive-loss")

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
            raise NotFound(f"header.job_id: no running job {job_id[:64]!r} at the passive party")
        if target_fp != job.target_fp:
            raise FailedPrecondition("header.target_fingerprint: not the target key of this job")
        return job

    def setup_job(
        self, job_id: str, config: JobConfig, target_fp: bytes, active_features: int, n_rows: int, ids: list[str]
    ) -> int:
        check_job_id(job_id)
        active_key = self._targets.get(target_fp)
        if active_key is None:
            raise FailedPrecondition("spec.target_fingerprint: unknown target key; call ExchangeKeys first")
        if len(ids) != n_rows:
            raise InvalidArgument(f"ids: spec.n_rows says {n_rows}, got {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise InvalidArgument("ids: must be unique")
        if active_features < 1:
            raise InvalidArgument("spec.active_features: expected at least 1")
        check_batch_size(config.batch_size, active_features, self.data.n_features, config.allow_small_batch)
        floor = min_batch_size(active_features, self.data.n_features, config.allow_small_batch)
        if n_rows < floor:
            raise InvalidArgument(f"spec.n_rows: expected at least {floor} training rows, got {n_rows}")
        with self._lock:
            if job_id in self._jobs or self.models.exists(job_id):
                raise AlreadyExists(f"spec.job_id: job {job_id!r} already exists at the passive party")
        job = self._build_job(job_id, config, target_fp, active_key, active_features, ids)
        self.checkpoints.save_setup(
            job_id,
            {
                "job_id": job_id,
                "config": config.model_dump(),
                "target_fingerprint": target_fp.hex(),
                "active_key": active_key.to_dict(),
                "active_features": active_features,
                "ids": ids,
            },
        )
        self._save_state(job)
        job.next_share = self._ahead.submit(self._encrypt_share, job, 0)
        with self._lock:
            self._jobs[job_id] = job
        log.info("event=job_setup job=%s rows=%d features=%d", job_id, n_rows, self.data.n_features)
        return self.data.n_features

    def _build_job(
        self,
        job_id: str,
        config: JobConfig,
        target_fp: bytes,
        active_key: PublicKey,
        active_features: int,
        ids: list[str],
    ) -> PassiveJob:
        positions = self.data.positions(ids, "ids")
        raw = self.data.features[positions]
        scaler = Scaler.fit(raw, config.standardize)
        x = scaler.transform(raw)
        w = initial_weights(config.seed, "passive", self.data.n_features, config.init_scale)
        job = PassiveJob(job_id, config, target_fp, active_key, active_features, x, scaler, w)
        # A sends each batch's rows; B expands the same seeded schedule only to
        # guess the next batch and encrypt its share ahead (see _share_for).
        floor = min_batch_size(active_features, self.data.n_features, config.allow_small_batch)
        job.expected = batch_schedule(
            len(ids), config.batch_size, config.epochs, config.seed, floor, config.max_iterations
        )
        return job

    def _save_state(self, job: PassiveJob) -> None:
        last = job.last_apply
        self.checkpoints.save_state(
            job.job_id,
            {
                "iteration": job.iteration,
                "w": job.w.tolist(),
                "last_update_sq_norm": job.last_update_sq_norm,
                "last_apply": None if last is None else [last[0], last[1].hex(), last[2]],
                "restarts": job.restarts,
            },
        )

    def restore_jobs(self) -> int:
        """Resume the jobs that were running when this process stopped: each
        at the start of its checkpointed iteration (A re-sends that
        iteration's steps). Returns how many."""
        restored = 0
        for setup, state in self.checkpoints.load_all():
            try:
                active_key = PublicKey.from_dict(setup["active_key"])
                target_fp = bytes.fromhex(setup["target_fingerprint"])
                job = self._build_job(
                    setup["job_id"],
                    JobConfig.model_validate(setup["config"]),
                    target_fp,
                    active_key,
                    int(setup["active_features"]),
                    list(setup["ids"]),
                )
                job.iteration = int(state["iteration"])
                job.w = np.asarray(state["w"], dtype=np.float64)
                job.last_update_sq_norm = state["last_update_sq_norm"]
                if state["last_apply"] is not None:
                    t, digest, norm = state["last_apply"]
                    job.last_apply = (int(t), bytes.fromhex(digest), float(norm))
                job.restarts = int(state["restarts"])
            except (KeyError, ValueError, VflError) as exc:
                log.warning("event=job_not_restored job=%s error=%s", setup.get("job_id"), exc)
                continue
            job.next_share = self._ahead.submit(self._encrypt_share, job, job.iteration)
            with self._lock:
                self._targets[target_fp] = active_key
                self._jobs[job.job_id] = job
            restored += 1
            log.info("event=job_restored job=%s iteration=%d", job.job_id, job.iteration)
        return restored

    def job_state(self, job_id: str, target_fp: bytes) -> tuple[int, Phase]:
        job = self._job(job_id, target_fp)
        with job.lock:
            return job.iteration, job.phase

    # --- training steps ---------------------------------------------------

    @GATE.working
    def residual_shares(self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage) -> CipherVector:
        """Steps 1-2: take [[a_S]]_A, answer [[b_S]]_B, and start step 3."""
        job = self._job(job_id, target_fp)
        with job.lock:
            digest = msg.digest()
            replayed = job.replay(iteration, "shares", digest)
            if replayed is not None:
                return cast(CipherVector, replayed)
            # Validate before anything changes: a malformed retry must not cost
            # the iteration its state (or its one restart).
            rows = rows_array(msg.rows, job.x.shape[0], "rows")
            floor = min_batch_size(job.active_features, job.x.shape[1], job.config.allow_small_batch)
            if rows.size < floor:
                raise InvalidArgument(f"rows: a batch of {rows.size} rows is under the job's minimum of {floor}")
            a_enc = msg.ciphers(job.active_key, "ciphertexts")
            a_enc.require_length(rows.size, "ciphertexts")
            if iteration == job.iteration and job.phase != Phase.SHARES:
                self._restart_iteration(job)
            job.expect(iteration, Phase.SHARES)
            x = job.x[rows]
            u, b, b_enc = self._share_for(job, iteration, rows)
            job.own_gradient = self._pool.submit(GATE.working(steps.masked_encrypted_gradient), self.backend, x, a_enc)
            every = job.config.loss_every
            # A asks for the loss share on these iterations (and on the last):
            # compute it after B's own product, before A asks.
            job.loss = None
            job.step4_sent.clear()
            if every and (iteration + 1) % every == 0:
                job.loss = self._loss.submit(self._loss_after_step4, job.step4_sent, a_enc, u)
            job.rows, job.a_enc, job.u, job.b, job.loss_sent = rows, a_enc, u, b, False
            job.phase = Phase.GRADIENTS
            job.answered = {"shares": (digest, b_enc)}
            return b_enc

    def _restart_iteration(self, job: PassiveJob) -> None:
        """A starts the current iteration again with a new request (it lost its
        state, or B's answer, in a failure). Allowed once per iteration and
        MAX_RESTARTS times per job: each restart lets A have one more vector
        of this batch decrypted, and the batch-size guard assumes at most two."""
        if job.restarted_at == job.iteration or job.restarts >= MAX_RESTARTS:
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
        log.warning(
            "event=iteration_restarted job=%s iteration=%d restarts=%d", job.job_id, job.iteration, job.restarts
        )

    def _encrypt_share(self, job: PassiveJob, iteration: int) -> tuple[int, np.ndarray, CipherVector] | None:
        """Step 2 ahead of time: B's share for the batch it expects next, under
        the weights it has now (they change only at step 5)."""
        if iteration >= len(job.expected):
            return None
        rows = job.expected[iteration].rows
        with GATE.busy():
            b = job.x[rows] @ job.w / 4.0
            return iteration, rows, steps.first_intermediate_share(self.backend, self.key.public, b)

    def _share_for(
        self, job: PassiveJob, iteration: int, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, CipherVector]:
        """u_B, b and [[b_S]]_B for the rows A sent: the share encrypted ahead
        if A sent the expected rows, else encrypted now."""
        u = job.x[rows] @ job.w
        b = u / 4.0
        ahead = job.next_share.result() if job.next_share is not None else None
        job.next_share = None
        if ahead is not None and ahead[0] == iteration and np.array_equal(ahead[1], rows):
            return u, b, ahead[2]
        return u, b, steps.first_intermediate_share(self.backend, self.key.public, b)

    @GATE.working
    def masked_gradients(
        self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage
    ) -> tuple[list[int], CipherVector]:
        """Steps 3-4: decrypt A's masked gradient, answer z_A and B's own."""
        job = self._job(job_id, target_fp)
        with job.lock:
            digest = msg.digest()
            replayed = job.replay(iteration, "gradients", digest)
            if replayed is not None:
                return cast(tuple[list[int], CipherVector], replayed)
            job.expect(iteration, Phase.GRADIENTS)
            grad_a = msg.ciphers(self.key.public, "ciphertexts")
            assert job.own_gradient is not None
            # B's own product first: if it failed, nothing is decrypted for A.
            own = job.own_gradient.result()
            z_a = steps.decrypt_masked_gradient(self.backend, self.key, grad_a, job.active_features + 1)
            job.phase = Phase.APPLY
            job.step4_sent.set()
            job.answered["gradients"] = (digest, (z_a, own.ciphers))
            return z_a, own.ciphers

    @GATE.working
    def apply_gradient(self, job_id: str, iteration: int, target_fp: bytes, msg: StepMessage) -> float:
        """Step 5: remove R_B, add X_B^T b, update w_B."""
        job = self._job(job_id, target_fp)
        with job.lock:
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
            cross = steps.unmask_gradient(z_b, own.mask, job.active_key, steps.cross_gradient_bound(x))
            grad = steps.gradient_from_shares(x, job.b, cross, job.w, job.config.l2, np.ones_like(job.w))
            grad = steps.dp_gaussian_noise(grad, job.config.dp_noise_std)
            new_w = steps.sgd_update(job.w, grad, job.config.learning_rate)
            update = float(np.sum((new_w - job.w) ** 2))
            job.last_update_sq_norm = update
            job.w = new_w
            level = logging.INFO if (iteration + 1) % 10 == 0 else logging.DEBUG
            log.log(level, "event=iteration_applied job=%s iteration=%d", job_id, iteration + 1)
            job.iteration += 1
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
        with job.lock:
            if job.iteration == iteration and "loss" in job.answered:
                # A retry: the same ciphertext again, never a second computation.
                pending = job.answered["loss"][1]
            else:
                if job.iteration != iteration or job.phase == Phase.SHARES:
                    raise FailedPrecondition(
                        f"header.iteration: the loss share of iteration {iteration} is available "
                        "after that iteration's residual shares"
                    )
                assert job.a_enc is not None and job.u is not None
                job.loss_sent = True
                if job.loss is None:
                    job.loss = self._loss.submit(steps.passive_loss_share, self.backend, job.a_enc, job.u)
                pending = job.loss
                job.answered["loss"] = (b"", pending)
        # Outside the lock: A's step 4 may run meanwhile.
        return cast(CipherVector, pending.result())

    def _loss_after_step4(self, step4_sent: threading.Event, a_enc: CipherVector, u: np.ndarray) -> CipherVector:
        # After B's answer to step 4, while A decrypts: off the critical path
        # and not competing with step 4 for the GIL. If step 4 does not come
        # soon, compute it anyway rather than hold a thread.
        step4_sent.wait(timeout=LOSS_WAIT_S)
        with GATE.busy():
            return steps.passive_loss_share(self.backend, a_enc, u)

    def finish_job(self, job_id: str, target_fp: bytes, aborted: bool) -> bool:
        if job_id not in self._jobs and not aborted and self.models.exists(job_id):
            # A retried FinishJob: the shard is stored. Only the job's own
            # target key learns that, so the call is no oracle for model ids.
            if self.models.load(job_id).get("target_fingerprint") == target_fp.hex():
                return True
        job = self._job(job_id, target_fp)
        with self._lock:
            self._jobs.pop(job_id, None)
        job.step4_sent.set()  # release a loss share still waiting for step 4
        self.checkpoints.remove(job_id)
        if aborted:
            log.info("event=job_aborted job=%s iteration=%d", job_id, job.iteration)
            return False
        self.models.save(
            job_id,
            {
                "model_id": job_id,
                "role": "passive",
                "created_unix": time.time(),
                "config": job.config.model_dump(),
                "target_fingerprint": job.target_fp.hex(),
                "active_key": job.active_key.to_dict(),
                "feature_names": self.data.feature_names,
                "weights": job.w.tolist(),
                "scaler": job.scaler.to_dict(),
                "metrics": {
                    "iterations": job.iteration,
                    "last_update_sq_norm": job.last_update_sq_norm,
                    "dp_noise_std": job.config.dp_noise_std,
                    **metrics.since(job.clock_start),
                },
            },
        )
        log.info("event=model_stored job=%s iterations=%d", job_id, job.iteration)
        return True

    # --- prediction -------------------------------------------------------

    @GATE.working
    def predict(self, model_id: str, target_fp: bytes, ids: list[str], msg: StepMessage) -> CipherVector:
        """Prediction: [[u_A]]_A + [[u_B]]_A, re-randomised."""
        shard = self.models.load(check_job_id(model_id, "header.job_id"))
        if bytes.fromhex(shard["target_fingerprint"]) != target_fp:
            raise FailedPrecondition("header.target_fingerprint: not the target key this model was trained under")
        active_key = PublicKey.from_dict(shard["active_key"])
        if not ids:
            raise InvalidArgument("ids: expected at least one id")
        u_a_enc = msg.ciphers(active_key, "ciphertexts")
        u_a_enc.require_length(len(ids), "ciphertexts")
        raw = self.data.features[self.data.positions(ids, "ids")]
        x = Scaler.from_dict(shard["scaler"]).transform(raw)
        u_b = x @ np.asarray(shard["weights"])
        return steps.target_prediction_data(self.backend, u_a_enc, u_b)
