"""Step 5's update rule: each party's optimiser, applied to its own weights.

Every party runs the job's optimiser on the gradient it unmasked in step 5a
and keeps the optimiser's state (velocity, moment estimates) to itself, in
its own checkpoint: nothing new crosses the wire. The state is an immutable
record, so that A can keep the previous one beside the previous weights and
redo an iteration B lost.

The rules, with g the gradient of iteration t (0-based) and lr_t the decayed
learning rate:

- sgd:      w -= lr_t g
- momentum: v = mu v + g;             w -= lr_t v
- nesterov: v = mu v + g;             w -= lr_t (g + mu v)
- adagrad:  G += g^2;                 w -= lr_t g / (sqrt(G) + eps)
- rmsprop:  E = rho E + (1 - rho) g^2; w -= lr_t g / (sqrt(E) + eps)
- adam:     m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
            w -= lr_t m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^(t+1)), v_hat likewise

Decay of the learning rate over iterations t, with rate r and period k:
step lr r^floor(t / k), exponential lr r^(t / k), inverse_time lr / (1 + r t / k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

OptimizerName = Literal["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"]
DecayName = Literal["none", "step", "exponential", "inverse_time"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

# Which optimisers keep a first-order (velocity / mean) and a second-order
# (squared-gradient) accumulator.
_FIRST = {"momentum", "nesterov", "adam"}
_SECOND = {"adagrad", "rmsprop", "adam"}


@dataclass(frozen=True)
class OptimizerSettings:
    """The job's update rule (from its JobConfig)."""

    name: str = "sgd"
    learning_rate: float = 0.15
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    rho: float = 0.9
    epsilon: float = 1e-8
    decay: str = "none"
    decay_rate: float = 0.5
    decay_steps: int = 100

    @classmethod
    def of(cls, config: Any) -> OptimizerSettings:
        """From a JobConfig (duck-typed: this module knows nothing of pydantic)."""
        return cls(
            name=config.optimizer,
            learning_rate=config.learning_rate,
            momentum=config.momentum,
            beta1=config.beta1,
            beta2=config.beta2,
            rho=config.rho,
            epsilon=config.epsilon,
            decay=config.lr_decay,
            decay_rate=config.decay_rate,
            decay_steps=config.decay_steps,
        )


@dataclass(frozen=True)
class OptimizerState:
    """What a party's optimiser carries from one iteration to the next."""

    steps: int  # updates applied so far
    first: np.ndarray | None = None
    second: np.ndarray | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "first": None if self.first is None else self.first.tolist(),
            "second": None if self.second is None else self.second.tolist(),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], settings: OptimizerSettings, size: int) -> OptimizerState:
        """A checkpointed state, checked against the job's optimiser and width
        (a ValueError says what does not fit)."""
        steps = int(record["steps"])
        if steps < 0:
            raise ValueError("optimizer.steps: expected >= 0")
        arrays: list[np.ndarray | None] = []
        for name, wanted in (("first", settings.name in _FIRST), ("second", settings.name in _SECOND)):
            value = record[name]
            if not wanted:
                if value is not None:
                    raise ValueError(f"optimizer.{name}: {settings.name} keeps no such state")
                arrays.append(None)
                continue
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != (size,) or not np.all(np.isfinite(arr)):
                raise ValueError(f"optimizer.{name}: expected {size} finite values")
            arrays.append(arr)
        return cls(steps, arrays[0], arrays[1])


def initial_state(settings: OptimizerSettings, size: int) -> OptimizerState:
    zeros = np.zeros(size, dtype=np.float64)
    return OptimizerState(
        0,
        zeros.copy() if settings.name in _FIRST else None,
        zeros.copy() if settings.name in _SECOND else None,
    )


def learning_rate_at(settings: OptimizerSettings, t: int) -> float:
    """The decayed learning rate of update t (0-based)."""
    lr, r, k = settings.learning_rate, settings.decay_rate, settings.decay_steps
    if settings.decay == "step":
        return float(lr * r ** (t // k))
    if settings.decay == "exponential":
        return float(lr * r ** (t / k))
    if settings.decay == "inverse_time":
        return lr / (1.0 + r * t / k)
    return lr


def optimizer_update(
    settings: OptimizerSettings, w: np.ndarray, gradient: np.ndarray, state: OptimizerState
) -> tuple[np.ndarray, OptimizerState]:
    """Step 5c (each party): the new weights and the optimiser's next state."""
    t = state.steps
    lr = learning_rate_at(settings, t)
    g = gradient
    name, eps = settings.name, settings.epsilon
    first, second = state.first, state.second
    if name == "sgd":
        step = g
    elif name in ("momentum", "nesterov"):
        assert first is not None
        first = settings.momentum * first + g
        step = first if name == "momentum" else g + settings.momentum * first
    elif name == "adagrad":
        assert second is not None
        second = second + g * g
        step = g / (np.sqrt(second) + eps)
    elif name == "rmsprop":
        assert second is not None
        second = settings.rho * second + (1.0 - settings.rho) * g * g
        step = g / (np.sqrt(second) + eps)
    elif name == "adam":
        assert first is not None and second is not None
        first = settings.beta1 * first + (1.0 - settings.beta1) * g
        second = settings.beta2 * second + (1.0 - settings.beta2) * g * g
        m_hat = first / (1.0 - settings.beta1 ** (t + 1))
        v_hat = second / (1.0 - settings.beta2 ** (t + 1))
        step = m_hat / (np.sqrt(v_hat) + eps)
    else:
        raise ValueError(f"optimizer: unknown {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    return np.asarray(w - lr * step, dtype=np.float64), OptimizerState(t + 1, first, second)


def smallest_learning_rate(settings: OptimizerSettings, iterations: int) -> float:
    """The learning rate of the job's last update (decay only lowers it)."""
    return learning_rate_at(settings, max(iterations - 1, 0)) if iterations else settings.learning_rate


def restored_state(record: dict[str, Any] | None, settings: OptimizerSettings, size: int, steps: int) -> OptimizerState:
    """A checkpoint's optimiser state. Checkpoints written before optimisers
    existed hold none, and plain SGD needs none beyond the step count."""
    if record is None:
        if settings.name != "sgd":
            raise ValueError(f"optimizer: the checkpoint holds no state for {settings.name}")
        return OptimizerState(steps)
    return OptimizerState.from_record(record, settings, size)
