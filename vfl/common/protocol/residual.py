"""The model a job trains: its residual shares, its loss and its link.

Both models split the residual d = f(u) - y of u = u_A + u_B into additive
shares the protocol of PROTOCOL.md carries unchanged, a at A (with the
labels) and b at B:

- logistic (the Taylor residual): d = u/4 + 1/2 - y, a = u_A/4 + 1/2 - y,
  b = u_B/4; loss log 2 - y' u/2 + u^2/8 with y' = 2y - 1; link sigmoid(u).
- linear: d = u - y, a = u_A - y, b = u_B; loss (u - y)^2 / 2; link u.

Either loss splits as A's own terms plus the cross term that B computes
under A's key, sum_i a_i u_B,i + c sum_i u_B,i^2, with c = 1/8 (logistic)
or 1/2 (linear); A decrypts it and adds its own terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def sigmoid(u: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * u)), dtype=np.float64)


@dataclass(frozen=True)
class ResidualModel:
    name: str
    slope: float  # d = slope * u + offset - y
    offset: float
    loss_square: float  # c: the weight of sum u_B^2 in B's loss share

    def active_share(self, u_active: np.ndarray, y: np.ndarray) -> np.ndarray:
        """A's share a of the residual (u_active includes the intercept)."""
        return np.asarray(self.slope * u_active + self.offset - y, dtype=np.float64)

    def passive_share(self, u_passive: np.ndarray) -> np.ndarray:
        """B's share b of the residual."""
        return np.asarray(self.slope * u_passive, dtype=np.float64)

    def passive_score(self, b: np.ndarray) -> np.ndarray:
        """u_B back from B's share (under DP, of the clipped share)."""
        return np.asarray(b / self.slope, dtype=np.float64)

    def active_loss(self, u_active: np.ndarray, y: np.ndarray, cross: float) -> float:
        """The batch's mean loss from A's own terms and the decrypted cross
        term sum_i a_i u_B,i + c sum_i u_B,i^2."""
        m = len(y)
        if self.name == "linear":
            a = u_active - y
            return (float(np.sum(a * a)) / 2.0 + cross) / m
        y_pm = 2.0 * y - 1.0
        return math.log(2.0) + (-float(np.sum(y_pm * u_active)) / 2.0 + float(np.sum(u_active**2)) / 8.0 + cross) / m

    def link(self, u: np.ndarray) -> np.ndarray:
        """What prediction returns for the score u: P(y = 1) or the value."""
        return sigmoid(u) if self.name == "logistic" else np.asarray(u, dtype=np.float64)

    def plain_loss(self, u: np.ndarray, y: np.ndarray) -> float:
        """The same loss on the joined data (the reference)."""
        if self.name == "linear":
            return float(np.mean((u - y) ** 2) / 2.0)
        return float(np.mean(math.log(2.0) - (2.0 * y - 1.0) * u / 2.0 + u**2 / 8.0))


LOGISTIC = ResidualModel("logistic", slope=0.25, offset=0.5, loss_square=1.0 / 8.0)
LINEAR = ResidualModel("linear", slope=1.0, offset=0.0, loss_square=0.5)
MODELS = {m.name: m for m in (LOGISTIC, LINEAR)}


def residual_model(name: str) -> ResidualModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"model: unknown {name!r}; expected one of {', '.join(MODELS)}") from None


@dataclass(frozen=True)
class PolynomialResidual:
    """d = P(u) - y, with P a polynomial fit of the sigmoid (PROTOCOL.md's
    construction extended, docs/POLY5.md). With u = u_A + u_B,

        P(u) = c_0 + own(u_A) + own(u_B) + cross(u_A, u_B),
        own(v) = sum_{k>=1} c_k v^k,
        cross = sum_{i=1}^{k-1} u_A^i q_i(u_B),  q_i(v) = sum_{j>i} c_j C(j, i) v^(j-i),

    so the cross term needs only [[u_A^i]]_A times plaintexts B computes."""

    name: str
    coefficients: tuple[float, ...]  # c_0 .. c_degree

    @property
    def degree(self) -> int:
        return len(self.coefficients) - 1

    def value(self, u: np.ndarray) -> np.ndarray:
        return np.asarray(np.polynomial.polynomial.polyval(u, self.coefficients), dtype=np.float64)

    def own(self, v: np.ndarray) -> np.ndarray:
        """The terms of P in one party's score alone, without c_0."""
        return np.asarray(self.value(v) - self.coefficients[0], dtype=np.float64)

    def cross_weights(self, u_passive: np.ndarray) -> np.ndarray:
        """q_i(u_B) for i = 1..degree-1 (rows), per sample (columns)."""
        c, k = self.coefficients, self.degree
        rows = [sum(c[j] * math.comb(j, i) * u_passive ** (j - i) for j in range(i + 1, k + 1)) for i in range(1, k)]
        return np.asarray(rows, dtype=np.float64).reshape(k - 1, len(u_passive))

    def cross(self, u_active: np.ndarray, u_passive: np.ndarray) -> np.ndarray:
        powers = np.vstack([u_active**i for i in range(1, self.degree)])
        return np.asarray(np.sum(powers * self.cross_weights(u_passive), axis=0), dtype=np.float64)

    def link(self, u: np.ndarray) -> np.ndarray:
        return sigmoid(u)


def sigmoid_fit(degree: int, bound: float) -> tuple[float, ...]:
    """Least-squares polynomial fit of the sigmoid over [-bound, bound] on a
    dense uniform grid. sigmoid(u) - 1/2 is odd, so the fit's even
    coefficients vanish but for c_0 = 1/2: set exactly, not left to rounding."""
    u = np.linspace(-bound, bound, 20_001)
    c = np.polynomial.polynomial.polyfit(u, sigmoid(u), degree)
    return tuple(0.5 if k == 0 else (float(v) if k % 2 else 0.0) for k, v in enumerate(c))


# Degree 5 over [-8, 8]: max |P - sigmoid| 0.061 there (the Taylor line's is
# 1.5); degree 3 diverges on separable data (the scores leave the range).
POLY5 = PolynomialResidual("poly5", sigmoid_fit(5, 8.0))
