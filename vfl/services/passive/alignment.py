"""B's side of an alignment (PROTOCOL.md "Alignment"; the steps are in
vfl/common/protocol/alignment.py): a session per alignment, holding B's fresh
scalar only until the alignment ends, and the store of finished ones.

B answers A's points with the same points raised to b and nothing else: no
error, count or timing of B's depends on which of A's ids B holds. What A
learns is the intersection and |B's set|, what B learns the intersection and
|A's set| (SECURITY.md). Any refusal ends the session: a peer that probes
gets one answer, and a fresh scalar next time.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vfl.common import psi
from vfl.common.alignments import AlignmentRecord, AlignmentStore
from vfl.common.data import PartyData
from vfl.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from vfl.common.models import ModelStore, check_job_id
from vfl.common.protocol.alignment import Shuffle, blind_own_ids, blind_peer_points, intersect, shuffle_own_ids
from vfl.services.passive.policy import PassivePolicy

log = logging.getLogger("vfl.passive.alignment")

# An alignment A does not finish within this time is dropped (its scalar forgotten).
SESSION_TTL_S = 3600.0
PURPOSES = ("training", "prediction")


@dataclass
class AlignmentSession:
    alignment_id: str
    peer: str
    purpose: str
    model_id: str
    active_size: int
    secret: psi.PsiSecret
    own: Shuffle
    started: float = field(default_factory=time.time)
    # H(x)^ab of A's points, in A's order, as B computed them in step 2.
    active_tags: bytearray = field(default_factory=bytearray)
    blind_started: bool = False
    active_done: bool = False
    fetch_started: bool = False
    fetched: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class PassiveAlignments:
    def __init__(self, data: PartyData, store: AlignmentStore, models: ModelStore, policy: PassivePolicy) -> None:
        self.data = data
        self.store = store
        self.models = models
        self.policy = policy
        self._sessions: dict[str, AlignmentSession] = {}
        self._lock = threading.Lock()

    def open(self, alignment_id: str, active_size: int, purpose: str, model_id: str, peer: str) -> int:
        """Step 1 at B: check A's request against B's policy, draw b and B's
        order. Returns |B's set|. B blinds its ids as A fetches them (step 3),
        while it raises A's points (step 2): both streams run at once."""
        check_job_id(alignment_id, "alignment_id")
        if purpose not in PURPOSES:
            raise InvalidArgument(f"purpose: expected one of {', '.join(PURPOSES)}")
        if not 1 <= active_size <= self.policy.max_alignment_size:
            raise InvalidArgument(
                f"active_size: expected 1 to {self.policy.max_alignment_size} ids "
                f"(VFL_MAX_ALIGNMENT_SIZE at B), got {active_size}"
            )
        if purpose == "prediction":
            self._check_prediction(model_id, peer)
        elif model_id:
            raise InvalidArgument("model_id: only for purpose PREDICTION")
        self._expire()
        with self._lock:
            earlier = self._sessions.get(alignment_id)
        if earlier is not None and earlier.peer == peer:
            # Its own peer starts it again (the connection broke mid-way): a fresh run, fresh scalars.
            self._close(earlier, "started again")
        with self._lock:
            if alignment_id in self._sessions or self.store.exists(alignment_id):
                raise AlreadyExists(f"alignment_id: alignment {alignment_id!r} already exists at the passive party")
            open_now = sum(1 for s in self._sessions.values() if s.peer == peer)
            if open_now >= self.policy.max_open_alignments:
                raise ResourceExhausted(
                    f"alignment_id: identity {peer!r} already runs {open_now} alignments at the passive party "
                    f"(VFL_MAX_OPEN_ALIGNMENTS at B)"
                )
            secret = psi.PsiSecret()
            own = shuffle_own_ids(len(self.data.ids))
            self._sessions[alignment_id] = AlignmentSession(
                alignment_id, peer, purpose, model_id, active_size, secret, own
            )
        log.info("event=alignment_opened alignment=%s active_size=%d purpose=%s", alignment_id, active_size, purpose)
        return len(self.data.ids)

    def _check_prediction(self, model_id: str, peer: str) -> None:
        if self.policy.predict_scope != "any":
            raise FailedPrecondition(
                "purpose: the passive party scores only a model's population, so it aligns no new ids for "
                "prediction (VFL_PREDICT_SCOPE at B)"
            )
        shard = self.models.load(check_job_id(model_id, "model_id"))
        if shard.get("peer") != peer:
            raise NotFound(f"model_id: no model {model_id!r} for identity {peer!r} at the passive party")

    def blind_active_set(self, alignment_id: str, peer: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Step 2 at B: A's points raised to b, chunk by chunk, in order."""
        session = self._session(alignment_id, peer)
        with self._ending_on_error(session):
            with session.lock:
                if session.blind_started:
                    raise FailedPrecondition(f"alignment_id: alignment {alignment_id!r} has had its step 2")
                session.blind_started = True
            for chunk in chunks:
                done = len(session.active_tags) // psi.POINT_BYTES
                tags = blind_peer_points(session.secret, chunk, "points", first_index=done)
                if len(session.active_tags) + len(tags) > session.active_size * psi.POINT_BYTES:
                    raise InvalidArgument(f"points: more than the {session.active_size} points of active_size")
                session.active_tags += tags
                yield tags
            if len(session.active_tags) != session.active_size * psi.POINT_BYTES:
                got = len(session.active_tags) // psi.POINT_BYTES
                raise InvalidArgument(f"points: active_size says {session.active_size}, got {got} points")
            session.active_done = True

    def fetch_passive_set(self, alignment_id: str, peer: str) -> Iterator[bytes]:
        """Step 3 at B: B's own blinded ids, shuffled, in bounded chunks,
        each computed as it is sent."""
        session = self._session(alignment_id, peer)
        with self._ending_on_error(session):
            with session.lock:
                if session.fetch_started:
                    raise FailedPrecondition(f"alignment_id: alignment {alignment_id!r} has had its step 3")
                session.fetch_started = True
            yield from blind_own_ids(session.secret, self.data.ids, session.own)
            session.fetched = True

    def finish(self, alignment_id: str, peer: str, chunks: Iterable[bytes]) -> AlignmentRecord:
        """Step 4 at B: B's points after both scalars come back from A in
        B's order; B intersects, stores its side and forgets b. The same
        request again (its answer was lost) gets the same answer."""
        tags = b"".join(chunks)
        request = hashlib.sha256(tags).hexdigest()
        with self._lock:
            running = alignment_id in self._sessions
        if not running and self.store.exists(check_job_id(alignment_id, "alignment_id")):
            done = self.load(alignment_id, peer)
            if done.finish_digest == request:
                log.info("event=alignment_finish_replayed alignment=%s", alignment_id)
                return done
        session = self._session(alignment_id, peer)
        with self._ending_on_error(session):
            if not (session.active_done and session.fetched):
                raise FailedPrecondition(f"alignment_id: alignment {alignment_id!r} needs its steps 2 and 3 first")
            own = session.own
            if len(tags) != len(own) * psi.POINT_BYTES:
                raise InvalidArgument(
                    f"points: expected {len(own)} tags (this party's set), got {len(tags) / psi.POINT_BYTES:g}"
                )
            found = intersect(own, tags, bytes(session.active_tags))
            record = AlignmentRecord(
                alignment_id=alignment_id,
                created_unix=session.started,
                ids=tuple(self.data.ids[int(i)] for i in found.rows),
                active_size=session.active_size,
                passive_size=len(own),
                digest=found.digest,
                purpose=session.purpose,
                model_id=session.model_id,
                peer=peer,
                elapsed_s=time.time() - session.started,
                finish_digest=request,
            )
            self.store.save(record)
        self._close(session, "finished")
        log.info("event=alignment_stored alignment=%s size=%d", alignment_id, record.size)
        return record

    def load(self, alignment_id: str, peer: str) -> AlignmentRecord:
        """A stored alignment, for the identity that ran it only."""
        check_job_id(alignment_id, "alignment_id")
        try:
            record = self.store.load(alignment_id)
        except NotFound:
            record = None
        if record is None or record.peer != peer:
            raise NotFound(
                f"alignment_id: the passive party holds no alignment {alignment_id!r} for identity {peer!r}; "
                "run StartAlignment first"
            )
        return record

    def _session(self, alignment_id: str, peer: str) -> AlignmentSession:
        with self._lock:
            session = self._sessions.get(alignment_id)
        if session is None or session.peer != peer:
            raise NotFound(f"alignment_id: no running alignment {alignment_id[:64]!r} at the passive party")
        return session

    @contextmanager
    def _ending_on_error(self, session: AlignmentSession) -> Iterator[None]:
        # Also on GeneratorExit: A cancelled a stream, so the session is over.
        try:
            yield
        except BaseException as exc:
            self._close(session, f"ended on {type(exc).__name__}")
            raise

    def _close(self, session: AlignmentSession, why: str) -> None:
        with self._lock:
            if self._sessions.get(session.alignment_id) is session:
                del self._sessions[session.alignment_id]
        session.secret.forget()
        if why != "finished":
            log.info("event=alignment_ended alignment=%s why=%r", session.alignment_id, why)

    def _expire(self) -> None:
        now = time.time()
        with self._lock:
            old = [s for s in self._sessions.values() if now - s.started > SESSION_TTL_S]
        for session in old:
            self._close(session, "expired")
