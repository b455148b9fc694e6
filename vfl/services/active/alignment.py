"""A's side of an alignment (PROTOCOL.md "Alignment"; the steps are in
vfl/common/protocol/alignment.py): A drives the four calls, keeps its fresh
scalar only for the alignment, checks that B found the same intersection,
and stores its own ids in the alignment's order.

Step 2 (A's points, blinded chunk by chunk as they are sent, raised by B)
and step 3 (B's points, likewise, raised by A) run at once, so both parties'
cores work through both rounds of exponentiations together, and neither
party holds its whole blinded set.
"""

from __future__ import annotations

import builtins  # the class's list() method shadows the type in its annotations
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vfl.common import psi
from vfl.common.alignments import AlignmentRecord, AlignmentStore
from vfl.common.data import PartyData, check_ids
from vfl.common.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable, VflError
from vfl.common.models import check_job_id
from vfl.common.oserrors import owned_by
from vfl.common.protocol.alignment import (
    Shuffle,
    blind_own_ids,
    blind_peer_points,
    common_rows,
    intersect,
    shuffle_own_ids,
)
from vfl.common.storage import read_record, write_record
from vfl.services.active.peer import PassiveClient
from vfl.v1 import party_pb2

log = logging.getLogger("vfl.active.alignment")

RUNNING_KIND = "alignment-running"
PURPOSE_CODES = {
    "training": party_pb2.ALIGNMENT_PURPOSE_TRAINING,
    "prediction": party_pb2.ALIGNMENT_PURPOSE_PREDICTION,
}


@dataclass
class AlignmentRun:
    """An alignment as the client sees it: running, succeeded or failed."""

    alignment_id: str
    active_size: int
    started: float = field(default_factory=time.time)
    state: str = "running"  # running | succeeded | failed
    passive_size: int = 0
    error: str = ""
    record: AlignmentRecord | None = None
    done: threading.Event = field(default_factory=threading.Event)

    ended: float | None = None

    @property
    def elapsed_s(self) -> float:
        if self.record is not None:
            return self.record.elapsed_s
        return (self.ended or time.time()) - self.started

    @classmethod
    def stored(cls, record: AlignmentRecord) -> AlignmentRun:
        run = cls(record.alignment_id, record.active_size, record.created_unix, "succeeded", record.passive_size)
        run.record = record
        run.done.set()
        return run


class ActiveAlignments:
    def __init__(
        self,
        data: PartyData,
        store: AlignmentStore,
        peer: PassiveClient,
        recovery_s: float = 120.0,
        running_dir: Path | None = None,
        parties: Mapping[str, PassiveClient] | None = None,
    ) -> None:
        """`parties`: with several passive parties, each one's client by
        name (then `peer` is unused): an alignment is one PSI with each."""
        self.data = data
        self.store = store
        self.peer = peer
        self.parties = dict(parties or {})
        self.recovery_s = recovery_s
        self._runs: dict[str, AlignmentRun] = {}
        self._lock = threading.Lock()
        # A marker per alignment in progress: after a restart of A, its
        # client learns that the alignment was cut short (FAILED), not NOT_FOUND.
        self._running_dir = running_dir
        self._interrupted()

    # --- client API -----------------------------------------------------

    def start(self, alignment_id: str, ids: Sequence[str]) -> AlignmentRun:
        """StartAlignment: checks here, so that their errors reach the
        caller; the intersection runs in the background."""
        run, ids = self._reserve(alignment_id, ids)
        threading.Thread(
            target=self._run_logged, args=(run, ids), name=f"align-{run.alignment_id}", daemon=True
        ).start()
        return run

    def run_now(self, ids: Sequence[str], purpose: str, model_id: str = "") -> AlignmentRecord:
        """An alignment in the caller's thread (Predict's new ids)."""
        run, ids = self._reserve("", ids, prefix="predict-")
        self._run_logged(run, ids, purpose, model_id)
        if run.record is None:
            raise FailedPrecondition(f"align_new_ids: {run.error}")
        return run.record

    def get(self, alignment_id: str) -> AlignmentRun:
        check_job_id(alignment_id, "alignment_id")
        with self._lock:
            run = self._runs.get(alignment_id)
        if run is not None:
            return run
        try:
            return AlignmentRun.stored(self.store.load(alignment_id))
        except NotFound:
            raise NotFound(f"alignment_id: no alignment {alignment_id!r}") from None

    def record(self, alignment_id: str, field_name: str = "alignment_id") -> AlignmentRecord:
        """A finished alignment, or a clear error naming the field."""
        check_job_id(alignment_id, field_name)
        run = self.get(alignment_id)
        if run.record is None:
            raise FailedPrecondition(f"{field_name}: alignment {alignment_id!r} is {run.state}, not succeeded")
        return run.record

    def list(self) -> list[AlignmentRun]:
        stored = {r.alignment_id: AlignmentRun.stored(r) for r in self.store.load_all()}
        with self._lock:
            stored.update(self._runs)
        return [stored[k] for k in sorted(stored)]

    # --- the alignment ----------------------------------------------------

    def _marker(self, alignment_id: str) -> Path | None:
        return None if self._running_dir is None else self._running_dir / f"{alignment_id}.json"

    def _interrupted(self) -> None:
        if self._running_dir is None or not self._running_dir.is_dir():
            return
        for path in self._running_dir.glob("*.json"):
            try:
                alignment_id = check_job_id(path.stem)
                marker = read_record(path, RUNNING_KIND)
            except (VflError, OSError, KeyError, ValueError):
                path.unlink(missing_ok=True)
                continue
            if not self.store.exists(alignment_id):
                run = AlignmentRun(alignment_id, int(marker.get("active_size", 0)), float(marker.get("started", 0)))
                run.state, run.ended = "failed", run.started
                run.error = "the active party restarted during the alignment; start a new one"
                run.done.set()
                self._runs[alignment_id] = run
            path.unlink(missing_ok=True)

    def _reserve(
        self, alignment_id: str, ids: Sequence[str], prefix: str = "align-"
    ) -> tuple[AlignmentRun, builtins.list[str]]:
        alignment_id = (
            check_job_id(alignment_id, "alignment_id") if alignment_id else f"{prefix}{uuid.uuid4().hex[:12]}"
        )
        ids = list(ids) if ids else list(self.data.ids)
        check_ids(ids, "ids")
        self.data.positions(ids, "ids")  # A's own data: the caller may know what is missing
        with self._lock:
            earlier = self._runs.get(alignment_id)
            if (earlier is not None and earlier.state != "failed") or self.store.exists(alignment_id):
                raise AlreadyExists(f"alignment_id: alignment {alignment_id!r} already exists")
            run = AlignmentRun(alignment_id, len(ids))
            self._runs[alignment_id] = run
        marker = self._marker(alignment_id)
        if marker is not None:
            try:
                write_record(marker, RUNNING_KIND, {"started": run.started, "active_size": len(ids)}, durable=False)
            except BaseException as exc:
                with self._lock:
                    self._runs.pop(alignment_id, None)
                if isinstance(exc, VflError):
                    raise owned_by("active", exc) from None  # a full disk: refused at once, as StartTraining
                raise
        return run, ids

    def _run_logged(
        self, run: AlignmentRun, ids: builtins.list[str], purpose: str = "training", model_id: str = ""
    ) -> None:
        try:
            record = self._align(run, ids, purpose, model_id)
        except VflError as exc:
            run.state, run.error = "failed", str(owned_by("active", exc))
            log.warning("event=alignment_failed alignment=%s error=%r", run.alignment_id, run.error)
        except Exception as exc:  # a bug: the alignment fails, the service stays up
            run.state, run.error = "failed", f"internal error: {type(exc).__name__}"
            log.exception("event=alignment_failed alignment=%s", run.alignment_id)
        else:
            run.record, run.state = record, "succeeded"
            with self._lock:
                self._runs.pop(run.alignment_id, None)  # the store answers from now on
            log.info(
                "event=alignment_stored alignment=%s size=%d active=%d passive=%d seconds=%.2f",
                run.alignment_id,
                record.size,
                record.active_size,
                record.passive_size,
                record.elapsed_s,
            )
        finally:
            run.ended = time.time()
            marker = self._marker(run.alignment_id)
            if marker is not None:
                marker.unlink(missing_ok=True)
            run.done.set()

    def _align(self, run: AlignmentRun, ids: builtins.list[str], purpose: str, model_id: str) -> AlignmentRecord:
        if self.parties:
            record = align_with_parties(self.parties, run.alignment_id, ids, purpose, model_id, run, self.recovery_s)
        else:
            record = align_as_active(self.peer, run.alignment_id, ids, purpose, model_id, run, self.recovery_s)
        self.store.save(record)
        return record


def align_with_parties(
    parties: Mapping[str, PassiveClient],
    alignment_id: str,
    ids: builtins.list[str],
    purpose: str = "training",
    model_id: str = "",
    run: AlignmentRun | None = None,
    recovery_s: float = 0.0,
) -> AlignmentRecord:
    """docs/PARTIES.md "Alignment": the two-party PSI with each passive party
    under the same alignment id, then the ids all of them hold, in the first
    party's alignment order, with each one's positions in its own alignment.
    Each B_j stores its own pairwise alignment and learns only that one."""
    started = run.started if run is not None else time.time()
    pairwise = {
        name: align_as_active(client, alignment_id, ids, purpose, model_id, None, recovery_s)
        for name, client in sorted(parties.items())
    }
    common = common_rows({name: list(r.ids) for name, r in pairwise.items()})
    if run is not None:
        run.passive_size = min(r.passive_size for r in pairwise.values())
    digest = hashlib.sha256(b"".join(pairwise[n].digest for n in sorted(pairwise))).digest()
    return AlignmentRecord(
        alignment_id=alignment_id,
        created_unix=started,
        ids=tuple(common.ids),
        active_size=len(ids),
        passive_size=min(r.passive_size for r in pairwise.values()),
        digest=digest,
        purpose=purpose,
        model_id=model_id,
        elapsed_s=time.time() - started,
        party_rows={name: tuple(rows) for name, rows in common.positions.items()},
    )


def align_as_active(
    peer: PassiveClient,
    alignment_id: str,
    ids: list[str],
    purpose: str = "training",
    model_id: str = "",
    run: AlignmentRun | None = None,
    recovery_s: float = 0.0,
) -> AlignmentRecord:
    """The four calls of an alignment, A's side; A's ids in the intersection,
    in the alignment's order. Fails unless B found the same intersection.
    While B cannot be reached (for up to recovery_s), steps 1-3 start again
    from the beginning with fresh scalars, and step 4 is re-sent as it was."""
    started = run.started if run is not None else time.time()
    deadline = time.monotonic() + recovery_s
    delay = 0.1
    while True:
        secret = psi.PsiSecret()
        try:
            passive_size, own, own_tags, passive_tags = _blind_both_sets(
                peer, secret, alignment_id, ids, purpose, model_id
            )
            break
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            log.warning("event=alignment_restarted alignment=%s", alignment_id)
            time.sleep(delay)
            delay = min(2.0, delay * 2)
        finally:
            secret.forget()
    if run is not None:
        run.passive_size = passive_size
    while True:
        try:
            size, digest = peer.finish_alignment(alignment_id, passive_tags)
            break
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2.0, delay * 2)
    found = intersect(own, own_tags, passive_tags)
    if (size, digest) != (len(found), found.digest):
        # Not a result either party may use: the two sides differ.
        raise FailedPrecondition(
            f"alignment {alignment_id!r}: the passive party found {size} ids in the intersection and this "
            f"party {len(found)}, or different ones (digests differ); the alignment is not stored"
        )
    return AlignmentRecord(
        alignment_id=alignment_id,
        created_unix=started,
        ids=tuple(ids[int(i)] for i in found.rows),
        active_size=len(ids),
        passive_size=passive_size,
        digest=found.digest,
        purpose=purpose,
        model_id=model_id,
        elapsed_s=time.time() - started,
    )


def _blind_both_sets(
    peer: PassiveClient, secret: psi.PsiSecret, alignment_id: str, ids: list[str], purpose: str, model_id: str
) -> tuple[int, Shuffle, bytes, bytes]:
    """Steps 1-3: (|B's set|, A's blinded set, its tags H(x)^ab, B's tags H(y)^ba)."""
    passive_size = peer.start_alignment(alignment_id, len(ids), PURPOSE_CODES[purpose], model_id)
    own = shuffle_own_ids(len(ids))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="active-psi") as pool:
        passive = pool.submit(_blind_passive_set, peer, secret, alignment_id, passive_size)
        own_tags = peer.blind_active_set(alignment_id, blind_own_ids(secret, ids, own), len(ids))
        passive_tags = passive.result()
    if len(passive_tags) != passive_size * psi.POINT_BYTES:
        raise FailedPrecondition(
            f"alignment {alignment_id!r}: the passive party announced {passive_size} points "
            f"and sent {len(passive_tags) // psi.POINT_BYTES}"
        )
    return passive_size, own, own_tags, passive_tags


def _blind_passive_set(peer: PassiveClient, secret: psi.PsiSecret, alignment_id: str, passive_size: int) -> bytes:
    """Step 3 at A: each chunk of B's points raised to a as it arrives."""
    out = bytearray()
    for chunk in peer.fetch_passive_set(alignment_id, passive_size):
        out += blind_peer_points(secret, chunk, "passive points", first_index=len(out) // psi.POINT_BYTES)
    return bytes(out)
