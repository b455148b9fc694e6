"""Alignments: each party's side of a private set intersection, in its own
storage. A record holds the party's OWN ids in the intersection, in the
alignment's canonical order (ascending tag H(x)^ab, the same at both
parties), so that a position in the alignment names the same customer at A
and at B without an id ever travelling."""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfl.common.errors import DamagedFile, InvalidArgument, NotFound
from vfl.common.models import check_job_id
from vfl.common.storage import quarantine, read_record, relative_name, write_record

log = logging.getLogger("vfl.alignments")

KIND = "alignment"


@dataclass(frozen=True)
class AlignmentRecord:
    alignment_id: str
    created_unix: float
    ids: tuple[str, ...]  # this party's own ids, in the alignment's order
    active_size: int
    passive_size: int
    digest: bytes  # SHA-256 over the sorted tags: both parties hold the same one
    purpose: str = "training"  # or "prediction"
    model_id: str = ""  # prediction alignments: the model they score for
    peer: str = ""  # at B: the identity that ran it (only it may use it)
    elapsed_s: float = 0.0
    finish_digest: str = ""  # at B: SHA-256 of step 4's request, to answer a retry of it again
    # At A with several passive parties: `ids` are those every party holds,
    # and party_rows[name][i] is ids[i]'s position in B_name's own alignment
    # with A (the alignment id is the same at every B), all B_name is sent.
    party_rows: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.ids)

    def positions(self, ids: list[str], field: str) -> list[int]:
        """Positions of this party's own `ids` in the alignment; an id that is
        not in it is an error naming how many (the caller's own data)."""
        index = self.index()
        missing = sum(1 for i in ids if i not in index)
        if missing:
            raise InvalidArgument(
                f"{field}: {missing} of {len(ids)} ids are not in alignment {self.alignment_id!r} "
                f"({self.size} ids); align them first"
            )
        return [index[i] for i in ids]

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {x: i for i, x in enumerate(self.ids)}

    def index(self) -> dict[str, int]:
        """Position by id (built once per record: Predict asks on every call)."""
        return self._index

    def ids_at(self, rows: list[int], field: str) -> list[str]:
        """This party's ids at positions `rows`; a position outside is an error."""
        bad = sum(1 for r in rows if not 0 <= r < self.size)
        if bad:
            raise InvalidArgument(
                f"{field}: {bad} of {len(rows)} positions are outside alignment {self.alignment_id!r} "
                f"(expected 0 <= row < {self.size})"
            )
        if len(set(rows)) != len(rows):
            raise InvalidArgument(f"{field}: {len(rows) - len(set(rows))} positions are repeated")
        return [self.ids[r] for r in rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "alignment_id": self.alignment_id,
            "created_unix": self.created_unix,
            "ids": list(self.ids),
            "active_size": self.active_size,
            "passive_size": self.passive_size,
            "digest": self.digest.hex(),
            "purpose": self.purpose,
            "model_id": self.model_id,
            "peer": self.peer,
            "elapsed_s": self.elapsed_s,
            "finish_digest": self.finish_digest,
            "party_rows": {name: list(rows) for name, rows in self.party_rows.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlignmentRecord:
        return cls(
            alignment_id=str(d["alignment_id"]),
            created_unix=float(d["created_unix"]),
            ids=tuple(str(i) for i in d["ids"]),
            active_size=int(d["active_size"]),
            passive_size=int(d["passive_size"]),
            digest=bytes.fromhex(d["digest"]),
            purpose=str(d.get("purpose", "training")),
            model_id=str(d.get("model_id", "")),
            peer=str(d.get("peer", "")),
            elapsed_s=float(d.get("elapsed_s", 0.0)),
            finish_digest=str(d.get("finish_digest", "")),
            party_rows={str(n): tuple(int(r) for r in rows) for n, rows in d.get("party_rows", {}).items()},
        )


class AlignmentStore:
    """Checked records under <data_dir>/alignments/<alignment_id>.json,
    written atomically and durably; a damaged one is quarantined and refused
    with DATA_LOSS, the others unaffected (as ModelStore)."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._dir = data_dir / "alignments"
        self._lock = threading.Lock()
        self._cache: dict[str, AlignmentRecord] = {}

    def _path(self, alignment_id: str) -> Path:
        return self._dir / f"{check_job_id(alignment_id, 'alignment_id')}.json"

    def exists(self, alignment_id: str) -> bool:
        return self._path(alignment_id).exists()

    def save(self, record: AlignmentRecord) -> None:
        write_record(self._path(record.alignment_id), KIND, record.to_dict())
        with self._lock:
            self._cache[record.alignment_id] = record

    def load(self, alignment_id: str) -> AlignmentRecord:
        path = self._path(alignment_id)
        with self._lock:
            cached = self._cache.get(alignment_id)
        if cached is not None and path.exists():
            return cached
        name = relative_name(path, self._data_dir)
        try:
            record = AlignmentRecord.from_dict(read_record(path, KIND))
        except FileNotFoundError:
            raise NotFound(f"alignment_id: no alignment {alignment_id!r}") from None
        except DamagedFile as exc:
            with self._lock:
                moved = quarantine(path, self._data_dir, exc.reason)
            log.warning("event=alignment_damaged alignment=%s path=%s reason=%r", alignment_id, name, exc.reason)
            raise DamagedFile(
                path,
                exc.reason,
                f"alignment {alignment_id!r}: {name} is damaged ({exc.reason}); moved to "
                f"{relative_name(moved, self._data_dir)}",
            ) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise DamagedFile(
                path, "unreadable", f"alignment {alignment_id!r}: {name} cannot be used ({exc})"
            ) from None
        with self._lock:
            self._cache[alignment_id] = record
        return record

    def list_ids(self) -> list[str]:
        if not self._dir.exists():
            return []
        stems = (p.stem for p in self._dir.glob("*.json"))
        out = []
        for s in stems:
            try:
                out.append(check_job_id(s))
            except InvalidArgument:
                continue
        return sorted(out)

    def load_all(self) -> list[AlignmentRecord]:
        out = []
        for alignment_id in self.list_ids():
            try:
                out.append(self.load(alignment_id))
            except (DamagedFile, NotFound):
                continue
        return out
