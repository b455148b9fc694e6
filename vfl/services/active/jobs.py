"""A's job records: one training job's progress, observable by status
calls and watchers (GetJobStatus, WatchJob), whatever runs it."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from vfl.common.jobconfig import JobConfig

# Iterations whose pace gives the estimate of the time to finish.
ETA_WINDOW = 20


class State(Enum):
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    CANCELLED = 4


class JobCancelled(Exception):
    """Raised in a job's own thread, between iterations, once CancelJob asked it to stop."""


@dataclass
class Event:
    state: State
    iteration: int
    total: int
    epoch: int
    loss: float | None
    message: str = ""
    dp_epsilon_spent: float | None = None
    eta_s: float | None = None


@dataclass
class TrainingJob:
    """One job's progress, observable by status calls and watchers."""

    job_id: str
    config: JobConfig
    total: int
    started: float = field(default_factory=time.time)
    state: State = State.RUNNING
    iteration: int = 0
    epoch: int = 0
    loss: float | None = None
    error: str = ""
    losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, batch loss)
    dp_epsilon_spent: float | None = None  # under DP: on y, by the z_B released so far
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (checked iteration, loss)
    best_iteration: int | None = None  # the check with the lowest validation loss
    events: list[Event] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    # (iteration, time) of the latest iterations: the pace the estimate uses.
    marks: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=ETA_WINDOW + 1))
    # With holdout ids: the stored model's AUC and KS statistic on them.
    validation_auc: float | None = None
    validation_ks: float | None = None
    # Set by CancelJob; the job's thread stops at its next check.
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def raise_if_cancelled(self) -> None:
        """Called by the job's own thread where stopping leaves nothing half
        done: before an iteration, and while waiting for a peer."""
        if self.cancel_requested.is_set():
            raise JobCancelled(f"job {self.job_id}: cancelled by the client at iteration {self.iteration}")

    def ended(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the job to leave RUNNING."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.state == State.RUNNING:
                left = deadline - time.monotonic()
                if left <= 0 or not self.cond.wait(left):
                    return self.state != State.RUNNING
        return True

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds to the last planned iteration at the pace of the last
        ETA_WINDOW iterations, counted from the latest one; None unless
        running with two iterations seen."""
        if self.state != State.RUNNING or len(self.marks) < 2:
            return None
        (i0, t0), (i1, t1) = self.marks[0], self.marks[-1]
        if i1 <= i0:
            return None
        per_iteration = (t1 - t0) / (i1 - i0)
        since = (time.time() if now is None else now) - t1
        return max(0.0, per_iteration * (self.total - self.iteration) - since)

    def publish(self, message: str = "") -> None:
        with self.cond:
            now = time.time()
            if not self.marks or self.marks[-1][0] != self.iteration:
                self.marks.append((self.iteration, now))
            self.events.append(
                Event(
                    self.state,
                    self.iteration,
                    self.total,
                    self.epoch,
                    self.loss,
                    message,
                    self.dp_epsilon_spent,
                    self.eta_s(now),
                )
            )
            self.cond.notify_all()

    def watch(self, timeout_s: float = 3600.0) -> Iterator[Event]:
        """Every event so far, then new ones until the job ends."""
        seen = 0
        while True:
            with self.cond:
                while seen >= len(self.events):
                    if not self.cond.wait(timeout_s):
                        return
                batch = self.events[seen:]
                seen = len(self.events)
            for ev in batch:
                yield ev
                if ev.state != State.RUNNING:
                    return
