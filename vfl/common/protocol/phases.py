"""Where a passive party is within an iteration: the step it expects next.
A domain value; the wire's JobPhase enum is mapped to and from it by the RPC
layer (B's servicer, A's client of B)."""

from __future__ import annotations

from enum import Enum


class Phase(Enum):
    SHARES = "residual shares"  # steps 1-2
    GRADIENTS = "masked gradients"  # steps 3-4
    APPLY = "apply gradient"  # step 5
