"""A's job records: one training job's progress, observable by status
calls and watchers (GetJobStatus, WatchJob), whatever runs it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from vfl.common.jobconfig import JobConfig


class State(Enum):
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3


@dataclass
class Event:
    state: State
    iteration: int
    total: int
    epoch: int
    loss: float | None
    message: str = ""
    dp_epsilon_spent: float | None = None


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

    def publish(self, message: str = "") -> None:
        with self.cond:
            self.events.append(
                Event(self.state, self.iteration, self.total, self.epoch, self.loss, message, self.dp_epsilon_spent)
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
