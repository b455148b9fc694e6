"""Differential privacy of what a party releases to its peer (PROTOCOL.md,
"Known residual leakage"): the Gaussian mechanism on the masked cross
gradient the decrypting party returns, calibrated to a target (epsilon,
delta) and accounted with Google's dp-accounting (Renyi DP: exact for a
Gaussian mechanism and its compositions up to the RDP-to-(epsilon, delta)
conversion, and robust over the whole range of multipliers).

Who adds what:
- A adds noise to z_B = X_B^T a + R_B before returning it: this protects
  the labels y from B. One label changes a_i = u_A/4 + 1/2 - y_i by exactly
  1, so X_B^T a moves by the row x_B,i, whose L2 norm B clips to C_B:
  sensitivity C_B.
- B adds noise to z_A = [X_A, 1]^T b + R_A before returning it: this
  protects X_B from A. Replacing one row of X_B (clipped to C_B) moves
  b_i = x_B,i . w_B / 4 by at most C_B |w_B| / 2, and [X_A, 1]^T b by that
  times |[x_A,i, 1]| <= sqrt(C_A^2 + 1): sensitivity sqrt(C_A^2 + 1) C_B
  |w_B| / 2, with B's current weights.

Sampling, honestly: batches are a shuffled partition of the rows in each
epoch, and both parties know the batch rows, so there is no amplification
by sampling. A row is in exactly one batch per epoch: over a job it is
released once per epoch (plus once per restarted iteration that holds it),
and the accountant composes that many Gaussian mechanisms (replace-one
adjacency).
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Sequence

import dp_accounting
import numpy as np
from dp_accounting import rdp

# The noise multiplier search: sigma / sensitivity in [lo, hi].
_MULTIPLIER_BOUNDS = dp_accounting.ExplicitBracketInterval(0.05, 1e4)


def _accountant() -> rdp.RdpAccountant:
    return rdp.RdpAccountant()


def _event(multiplier: float, releases: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(multiplier), releases)


@functools.lru_cache(maxsize=256)
def noise_multiplier(epsilon: float, delta: float, releases: int) -> float:
    """sigma / sensitivity such that `releases` Gaussian mechanisms on the
    same row spend at most (epsilon, delta)."""
    if epsilon <= 0 or releases < 1:
        raise ValueError("noise_multiplier: expected epsilon > 0 and releases >= 1")
    return float(
        dp_accounting.calibrate_dp_mechanism(
            _accountant,
            lambda z: _event(z, releases),
            epsilon,
            delta,
            _MULTIPLIER_BOUNDS,
            tol=1e-4,
        )
    )


@functools.lru_cache(maxsize=1024)
def epsilon_spent(multiplier: float, delta: float, releases: int) -> float:
    """The epsilon (at delta) spent by `releases` Gaussian mechanisms of this
    noise multiplier on one row; 0 before the first."""
    if releases <= 0:
        return 0.0
    acc = _accountant()
    acc.compose(_event(multiplier, releases))
    return float(acc.get_epsilon(delta))


def releases_per_row(iterations: int, batches_per_epoch: int) -> int:
    """How often one row is released over a job of `iterations` iterations:
    once per epoch the job touches."""
    return max(1, -(-iterations // max(1, batches_per_epoch)))


def epsilon_so_far(
    multiplier: float, delta: float, last_released: int, batches_per_epoch: int, extra_releases: int
) -> float:
    """Epsilon spent by a party that has released iterations 0..last_released
    (-1: none yet), plus `extra_releases` re-releases of restarted iterations."""
    if last_released < 0:
        return 0.0
    releases = releases_per_row(last_released + 1, batches_per_epoch) + extra_releases
    return epsilon_spent(multiplier, delta, releases)


def default_clip_norm(n_features: int) -> float:
    """A party's row clipping norm when its operator sets none: the RMS norm
    of a standardised row, sqrt(p)."""
    return math.sqrt(max(1, n_features))


def clip_rows(x: np.ndarray, norm: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most `norm` (rows inside are kept)."""
    lengths = np.linalg.norm(x, axis=1, keepdims=True)
    factor = np.minimum(1.0, norm / np.maximum(lengths, 1e-300))
    return np.asarray(x * factor, dtype=np.float64)


def label_sensitivity(passive_clip_norm: float) -> float:
    """Of X_B^T a to one label (A's noise on z_B)."""
    return passive_clip_norm


def feature_sensitivity(active_clip_norm: float, passive_clip_norm: float, w_passive: np.ndarray) -> float:
    """Of [X_A, 1]^T b to one row of X_B (B's noise on z_A), at B's weights."""
    return math.sqrt(active_clip_norm**2 + 1.0) * passive_clip_norm * float(np.linalg.norm(w_passive)) / 2.0


def gaussian_noise(std: float, length: int) -> np.ndarray:
    """N(0, std^2) per value, seeded from the OS CSPRNG (never from the job
    seed, which the peer knows)."""
    rng = np.random.default_rng(secrets.randbits(128))
    return rng.normal(0.0, std, size=length)


def noise_to_fixed(noise: Sequence[float] | np.ndarray, scale_bits: int) -> list[int]:
    """Noise as signed integers at the fixed-point scale of the value it is
    added to."""
    return [int(round(float(v) * (1 << scale_bits))) for v in noise]
