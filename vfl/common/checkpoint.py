"""Running jobs on disk, so that a party killed mid-training resumes them.

Per job, under <data_dir>/jobs/: `<job>.setup.json`, written once when the
job starts (config, keys' fingerprints, the job's ids), and `<job>.state.json`,
rewritten atomically after every iteration (weights, iteration, what a
retried step needs replayed). Both are owner-only checked records (see
vfl/common/storage.py), like the model shards; they hold no private key.
Removed when the job ends. A damaged one is moved to quarantine/ at start-up
and its job reported as one that cannot resume (see `SavedJob`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfl.common.errors import DamagedFile, InvalidArgument, VflError
from vfl.common.models import check_job_id
from vfl.common.storage import quarantine, read_record, relative_name, remove_temp_files, write_record

log = logging.getLogger("vfl.checkpoint")

_PARTS = ("setup", "state")


@dataclass(frozen=True)
class SavedJob:
    """A job found on disk at start-up. `problem` is empty if both files
    were read; else one line saying which file is missing or damaged and
    where it was moved, and `setup`/`state` are what could be read."""

    job_id: str
    setup: dict[str, Any] | None
    state: dict[str, Any] | None
    problem: str = ""
    missing: frozenset[str] = frozenset()  # "setup", "state": absent (not damaged)

    @property
    def damaged(self) -> bool:
        """A file of the job failed its checks (it is in quarantine now)."""
        return any(getattr(self, part) is None and part not in self.missing for part in _PARTS)


class JobCheckpoints:
    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._dir = data_dir / "jobs"

    def _path(self, job_id: str, part: str) -> Path:
        return self._dir / f"{check_job_id(job_id)}.{part}.json"

    def save_setup(self, job_id: str, setup: dict[str, Any]) -> None:
        write_record(self._path(job_id, "setup"), "job-setup", setup)

    def save_state(self, job_id: str, state: dict[str, Any], *, durable: bool) -> None:
        """`durable`: flushed with its directory before returning, for a state
        a decryption released to the peer depends on (it must survive a power
        cut, not only a killed process). Without, the write is atomic only
        and keeps a disk flush off the step."""
        write_record(self._path(job_id, "state"), "job-state", state, durable=durable)

    def remove(self, job_id: str) -> None:
        for part in ("state", "setup"):
            self._path(job_id, part).unlink(missing_ok=True)

    def files(self, job_id: str) -> list[Path]:
        """The job's checkpoint files that exist (for tests and clean-up checks)."""
        return [p for p in (self._path(job_id, part) for part in _PARTS) if p.exists()]

    def load_all(self) -> list[SavedJob]:
        """Every job that was running, by id. A missing or damaged file makes
        its job one that cannot resume: the damaged file goes to quarantine,
        the job is returned with its `problem`, and the party that owns it
        ends it (and removes what is left) instead of dropping it silently."""
        if not self._dir.is_dir():
            return []
        remove_temp_files(self._dir)
        ids: set[str] = set()
        for part in _PARTS:
            for path in self._dir.glob(f"*.{part}.json"):
                job_id = path.name.removesuffix(f".{part}.json")
                try:
                    ids.add(check_job_id(job_id))
                except InvalidArgument:
                    log.warning("event=checkpoint_ignored path=%s: not a job id", relative_name(path, self._data_dir))
        return [self._load(job_id) for job_id in sorted(ids)]

    def _load(self, job_id: str) -> SavedJob:
        read: dict[str, dict[str, Any] | None] = {}
        problems, missing = [], set()
        for part in _PARTS:
            path = self._path(job_id, part)
            name = relative_name(path, self._data_dir)
            read[part] = None
            try:
                read[part] = read_record(path, f"job-{part}")
            except FileNotFoundError:
                problems.append(f"checkpoint {name} is missing")
                missing.add(part)
            except DamagedFile as exc:
                moved = quarantine(path, self._data_dir, exc.reason)
                problems.append(
                    f"checkpoint {name} is damaged ({exc.reason}); moved to {relative_name(moved, self._data_dir)}"
                )
        problem = f"job {job_id}: {'; '.join(problems)}; the job cannot resume" if problems else ""
        if problem:
            log.warning("event=checkpoint_unusable job=%s problem=%r", job_id, problem)
        return SavedJob(job_id, read["setup"], read["state"], problem, frozenset(missing))


def unusable_reason(exc: Exception) -> str:
    """Why a checkpoint that passed its checks still cannot restore its job
    (its ids are no longer in the CSV, a field is missing), without its content."""
    if isinstance(exc, VflError):
        return str(exc)
    if isinstance(exc, KeyError):
        return f"no field {exc.args[0]!r}"
    return type(exc).__name__
