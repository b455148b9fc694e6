"""A with several passive parties B_1..B_k (VFL_PEERS; docs/PARTIES.md): key
exchange with each, the job set up at each with the others named, the
iterations driven by the protocol session (`ActiveSession`) over one
`PartyServicePort` per party, and prediction combined from every party's
PredictScores. The two-party job keeps its own loop in party.py (recovery,
validation, DP), which this one does not serve yet: a k-party job that loses a
party fails and is released at every party, and one that A's restart cut
short is reported FAILED with the reason, never resumed half-way."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from vfl.common import serde
from vfl.common.alignments import AlignmentRecord
from vfl.common.crypto.backend import HEBackend, PrivateKey, PublicKey, target_fingerprint
from vfl.common.errors import FailedPrecondition, InvalidArgument, Unavailable, VflError
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.batching import BatchSchedule, batch_schedule, coalition_feature_counts, min_batch_size
from vfl.common.protocol.sessions import ActiveSession, PartyInfo, TrainingPlan, combined_scores
from vfl.common.storage import read_record, write_record
from vfl.services.active.jobs import State, TrainingJob
from vfl.services.active.peer import PartyServicePort, PassiveClient, PredictionServicePort

log = logging.getLogger("vfl.active.coalition")

T = TypeVar("T")
RUNNING_KIND = "coalition-job-running"
RELEASE_PATIENCE_S = 10.0


@dataclass(frozen=True)
class PartyLink:
    """One passive party of a job: its client, key and feature count as
    key exchange gave them, and the target key A shares with it."""

    name: str
    client: PassiveClient
    key: PublicKey
    target_fp: bytes
    features: int

    @property
    def info(self) -> PartyInfo:
        return PartyInfo(self.name, self.key, self.features)


ONE_PASSIVE = "passive"  # the passive party's name in a session job without VFL_PEERS (residual poly5)


def refuse_unserved(config: JobConfig, passive_parties: int) -> None:
    """What a session job does not serve yet, one refusal naming the field."""
    if config.residual == "poly5" and passive_parties > 1:
        raise InvalidArgument(
            "config.residual: poly5 is served with one passive party only (its cross terms between passive "
            "parties are not built)"
        )
    if config.validation_every:
        raise InvalidArgument("config.validation_every: not served yet with several passive parties (VFL_PEERS)")
    if config.dp:
        raise InvalidArgument("config.dp_epsilon: not served yet with several passive parties (VFL_PEERS)")


def exchange_keys(
    parties: Mapping[str, PassiveClient], key: PrivateKey, backend: HEBackend, min_bits: int
) -> list[PartyLink]:
    """Key exchange with every passive party: each sends its public key and
    the target key's fingerprint, which must be A's own."""
    links = []
    for name, client in sorted(parties.items()):
        passive_key, their_fp = client.exchange_keys(key.public, min_bits)
        backend.require_scheme(passive_key, f"passive_key of {name}")
        fp = target_fingerprint(key.public, passive_key)
        if their_fp != fp:
            raise FailedPrecondition(f"target_fingerprint: passive party {name!r} computed a different target key")
        links.append(PartyLink(name, client, passive_key, fp, client.passive_features))
    return links


def schedule_for(config: JobConfig, rows: int, p_active: int, links: Sequence[PartyLink]) -> BatchSchedule:
    """The batches, with the floor that counts every coalition (PARTIES.md)."""
    p_a, p_b = coalition_feature_counts(p_active, [link.features for link in links])
    floor = min_batch_size(p_a, p_b, config.allow_small_batch)
    return batch_schedule(rows, config.batch_size, config.epochs, config.seed, floor, config.max_iterations)


def positions_of(alignment: AlignmentRecord, name: str, parties: int) -> Sequence[int]:
    """Party `name`'s positions of the alignment's ids in its own alignment
    with A: the record's party_rows, or, for the one passive party of a
    two-party alignment, the alignment's own positions."""
    if name in alignment.party_rows:
        return alignment.party_rows[name]
    if parties == 1 and not alignment.party_rows:
        return range(alignment.size)
    raise FailedPrecondition(
        f"alignment_id: alignment {alignment.alignment_id!r} was not run with passive party {name!r}; align again"
    )


def set_up_at_parties(
    links: Sequence[PartyLink],
    job_id: str,
    config: JobConfig,
    p_active: int,
    alignment: AlignmentRecord,
    rows: Sequence[int],
    holdout_rows: Sequence[int],
    on_set_up: Callable[[PartyLink], None],
) -> bool:
    """SetupJob at every party, each sent its own positions (of the training
    and of the holdout rows, which the model may score) and the others'
    names, keys and feature counts. `on_set_up` is told of each party before
    its call (from then on it may hold the job). Returns whether every party
    scores any row of its data for the model (VFL_PREDICT_SCOPE=any)."""
    any_row = True
    for link in links:
        own = positions_of(alignment, link.name, len(links))
        positions, held = [own[r] for r in rows], [own[r] for r in holdout_rows]
        on_set_up(link)
        reply = link.client.setup_job(
            job_id,
            config,
            link.target_fp,
            p_active,
            alignment.alignment_id,
            positions,
            held,
            party_name=link.name,
            peers=[other.info for other in links if other.name != link.name],
        )
        if reply.passive_features != link.features:
            raise FailedPrecondition(
                f"passive party {link.name!r}: announced {link.features} features at key exchange and "
                f"{reply.passive_features} at set-up"
            )
        any_row = any_row and reply.scores_any_row
    return any_row


def release_at_parties(targets: Iterable[tuple[str, PassiveClient, bytes]], job_id: str, iteration: int) -> None:
    """Best effort, at each (name, client, target fingerprint): drop the
    job's state, store nothing. Sent again for up to RELEASE_PATIENCE_S while
    a party cannot be reached."""
    for name, client, fp in targets:
        deadline = time.monotonic() + RELEASE_PATIENCE_S
        delay = 0.1
        while True:
            try:
                client.finish_job(serde.step_header(job_id, iteration, fp), aborted=True)
                break
            except Unavailable as exc:
                if time.monotonic() + delay > deadline:
                    log.warning("event=abort_not_delivered job=%s party=%s error=%r", job_id, name, str(exc))
                    break
                time.sleep(delay)
                delay = min(2.0, delay * 2)
            except VflError as exc:  # e.g. NOT_FOUND: the party never had the job
                log.warning("event=abort_not_delivered job=%s party=%s error=%r", job_id, name, str(exc))
                break


def thread_fan_out(pool: ThreadPoolExecutor) -> Callable[[Callable[[str], object], Iterable[str]], list[object]]:
    """The session's fan-out on a pool: the parties compute at once."""
    return lambda fn, names: list(pool.map(fn, names))


def active_session(
    backend: HEBackend,
    key: PrivateKey,
    job_id: str,
    config: JobConfig,
    x: np.ndarray,
    y: np.ndarray,
    w0: np.ndarray,
    links: Sequence[PartyLink],
    pool: ThreadPoolExecutor,
) -> ActiveSession:
    infos = [link.info for link in links]
    ports = {
        link.name: PartyServicePort(
            link.client,
            job_id,
            link.target_fp,
            key.public,
            link.key,
            link.features,
            peers={o.name: o.key for o in links if o.name != link.name},
            name=link.name,
        )
        for link in links
    }
    return ActiveSession(backend, key, x, y, w0, TrainingPlan.of(config), infos, ports, thread_fan_out(pool))


def run_iterations(
    job: TrainingJob, session: ActiveSession, schedule: BatchSchedule, recovery_s: float = 120.0
) -> None:
    """The job's iterations, its progress published after each; the loss on
    config.loss_every's iterations and the last; early stop on config.tol.
    A party that cannot be reached is waited for, up to recovery_s at a
    time: the iteration is repeated with the same requests (see
    ActiveSession.iteration), so the model is the uninterrupted one."""
    config = job.config
    prev_loss: float | None = None
    for t, batch in enumerate(schedule):
        job.raise_if_cancelled()
        every = config.loss_every
        due = bool(every) and ((t + 1) % every == 0 or t + 1 == len(schedule))
        loss = _with_retries(
            functools.partial(session.iteration, t, batch.rows.tolist(), check_loss=due), job, t, recovery_s
        )
        job.iteration, job.epoch = t + 1, batch.epoch
        message = ""
        if loss is not None:
            job.loss = loss
            job.losses.append((t + 1, loss))
            if config.tol > 0 and prev_loss is not None and abs(loss - prev_loss) < config.tol:
                message = f"early stop: loss change {abs(loss - prev_loss):.3g} < tol {config.tol:g}"
            prev_loss = loss
        level = logging.INFO if (t + 1) % 10 == 0 or t + 1 == len(schedule) else logging.DEBUG
        log.log(level, "event=iteration job=%s iteration=%d epoch=%d loss=%s", job.job_id, t + 1, batch.epoch, loss)
        if message:
            job.publish(message)
            return
        job.publish()


def _with_retries(call: Callable[[], T], job: TrainingJob, t: int, recovery_s: float) -> T:
    deadline = time.monotonic() + recovery_s
    delay = 0.1
    while True:
        job.raise_if_cancelled()
        try:
            return call()
        except Unavailable as exc:
            if time.monotonic() + delay > deadline:
                raise Unavailable(
                    f"job {job.job_id}: a passive party was unreachable for {recovery_s:.0f} s: {exc}"
                ) from None
            log.warning("event=peer_lost job=%s iteration=%d error=%r", job.job_id, t, str(exc))
            time.sleep(delay)
            delay = min(2.0, delay * 2)


def finish_at_parties(links: Sequence[PartyLink], job: TrainingJob, iteration: int, recovery_s: float = 120.0) -> None:
    """FinishJob at every party: each stores its shard (and answers a
    repeated FinishJob from it, so a lost answer is asked again)."""
    for link in links:
        header = serde.step_header(job.job_id, iteration, link.target_fp)
        _with_retries(functools.partial(link.client.finish_job, header, aborted=False), job, iteration, recovery_s)


def parties_record(links: Sequence[PartyLink]) -> list[dict[str, Any]]:
    """What A's model shard keeps of each party: to score with it later."""
    return [
        {
            "name": link.name,
            "passive_key": link.key.to_dict(),
            "target_fingerprint": link.target_fp.hex(),
            "passive_features": link.features,
        }
        for link in links
    ]


def predict_with_parties(
    backend: HEBackend,
    key: PrivateKey,
    shard: Mapping[str, Any],
    parties: Mapping[str, PassiveClient],
    u_a: np.ndarray,
    alignment: AlignmentRecord,
    positions: Sequence[int],
    model_id: str,
) -> np.ndarray:
    """The model's probabilities for the ids at `positions` of `alignment`
    (one that every party holds): each party gets its own positions."""
    ports = {}
    for party in shard["parties"]:
        name = str(party["name"])
        passive_key = PublicKey.from_dict(party["passive_key"])
        fp = target_fingerprint(key.public, passive_key)
        if fp.hex() != party["target_fingerprint"]:
            raise FailedPrecondition("model_id: the model was trained under another key of this party")
        if name not in parties:
            raise FailedPrecondition(
                f"model_id: the model was trained with passive party {name!r}, which VFL_PEERS does not name"
            )
        own = positions_of(alignment, name, len(shard["parties"]))
        rows = [own[r] for r in positions]
        ports[name] = PredictionServicePort(parties[name], model_id, fp, alignment.alignment_id, rows)
    with ThreadPoolExecutor(max_workers=len(ports), thread_name_prefix="active-predict") as pool:
        model = TrainingPlan.of(JobConfig.model_validate(shard["config"])).model
        return combined_scores(backend, key, model, u_a, ports, thread_fan_out(pool))


class RunningMarkers:
    """A marker per k-party job in progress, naming its parties and target
    keys: after a restart of A, the job is reported FAILED (not NOT_FOUND)
    and released at every party."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir / "coalition-running"

    def _path(self, job_id: str) -> Path:
        return self._dir / f"{job_id}.json"

    def save(self, job_id: str, links: Sequence[PartyLink]) -> None:
        record = {"parties": {link.name: link.target_fp.hex() for link in links}, "started": time.time()}
        write_record(self._path(job_id), RUNNING_KIND, record)

    def remove(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)

    def interrupted(self) -> list[tuple[str, dict[str, bytes], float]]:
        """(job id, party name -> target fingerprint, started) of each marker left behind."""
        out = []
        for path in sorted(self._dir.glob("*.json")) if self._dir.is_dir() else []:
            try:
                record = read_record(path, RUNNING_KIND)
                fps = {str(n): bytes.fromhex(str(fp)) for n, fp in record["parties"].items()}
                out.append((path.stem, fps, float(record.get("started", 0.0))))
            except (VflError, OSError, KeyError, ValueError, AttributeError):
                log.warning("event=marker_unreadable path=%s", path.name)
                path.unlink(missing_ok=True)
        return out


def fail_interrupted(
    markers: RunningMarkers, parties: Mapping[str, PassiveClient], register: Callable[[TrainingJob], None]
) -> int:
    """The k-party jobs A's restart cut short: FAILED with the reason, released at each party."""
    count = 0
    for job_id, fps, started in markers.interrupted():
        job = TrainingJob(job_id, JobConfig(), total=0, started=started)
        job.state = State.FAILED
        job.error = (
            "the active party restarted during the job; jobs with several passive parties do not resume yet: "
            "start it again"
        )
        register(job)
        job.publish(job.error)
        release_at_parties([(n, parties[n], fp) for n, fp in fps.items() if n in parties], job_id, 0)
        markers.remove(job_id)
        log.warning("event=job_failed job=%s error=%r", job_id, job.error)
        count += 1
    return count
