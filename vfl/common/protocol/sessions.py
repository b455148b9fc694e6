"""Each party's per-iteration state machine as plain code: the step order,
the one-decryption rule and the step-5 update, for one active party A and
k >= 1 passive parties B_1..B_k (PROTOCOL.md, "Several passive parties").

No gRPC: a session talks to its peers through a port (`PassivePort`) that
takes and returns domain types, so two sessions can run against each other in
one process (tests/test_sessions.py), and a service can put the port on gRPC.

The pairwise construction. With a the residual share of A and b_j that of
B_j, the residual is d = a + sum_j b_j, and every party P needs
X_P^T d = X_P^T s_P + sum_{Q != P} X_P^T s_Q. For every other party Q, P
computes [[X_P^T s_Q + R_PQ]]_Q under Q's key, with a fresh mask R_PQ of its
own, and Q decrypts it: a ciphertext is only ever under the key of the party
whose value it carries, and every value a key owner decrypts is masked by the
party it belongs to. Messages between passive parties go through A (A relays
[[b_l]]_l to B_j, B_j's masked gradient under pk_l to B_l, and B_l's
decryption back to B_j); A sees them under keys it does not hold, or masked.

One iteration, A's view (`ActiveSession.iteration`):
  1-2 `exchange_residual_shares`: A -> B_j [[a]]_A; B_j -> A [[b_j]]_j.
  3   `exchange_masked_gradients`: A -> B_j [[X_A^T b_j + R_Aj]]_j and the
      other passive shares {[[b_l]]_l}; B_j -> A z_Aj (A's masked gradient,
      decrypted) and B_j's masked gradients {[[X_j^T s_Q + R_jQ]]_Q} for Q = A
      and every other B_l.
  4   `decrypt_peer_gradients` (k >= 2 only): A -> B_l the masked gradients
      the other B_j computed under pk_l; B_l -> A their decryptions. A decrypts
      those under pk_A itself.
  5   `apply_gradient`: A -> B_j every decryption of B_j's masked gradients;
      each party removes its masks, adds X_P^T s_P and updates its weights
      with its own optimiser (`steps.update_own_weights`).
With k = 1 step 4 carries nothing and the exchange is PROTOCOL.md's.

With the polynomial residual (a PolynomialResidual plan, docs/POLY5.md; k = 1
only, the cross terms between passive parties are not built), a step 0 comes
first: `exchange_score_powers`, A -> B [[u_A^i]]_A, B -> A [[cross + s]]_A
with a fresh mask s that B keeps; A's share is c_0 + own(u_A) - y + cross + s,
B's own(u_B) - s, integers at scale 2^32 that steps 1-5 then carry exactly
(`steps.encrypt_integer_share`, `steps.update_own_weights_exact`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from vfl.common.crypto.backend import CipherVector, HEBackend, PrivateKey, PublicKey
from vfl.common.errors import FailedPrecondition, InvalidArgument, OutOfRange
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol import steps
from vfl.common.protocol.optimizers import OptimizerSettings, OptimizerState
from vfl.common.protocol.residual import POLY5, PolynomialResidual, ResidualModel

ACTIVE = "active"  # A's name in the maps keyed by party

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class TrainingPlan:
    """What both kinds of session need of a job's configuration."""

    model: ResidualModel | PolynomialResidual
    optimizer: OptimizerSettings
    l2: float

    @classmethod
    def of(cls, config: JobConfig, model: ResidualModel | PolynomialResidual | None = None) -> TrainingPlan:
        """From a job's configuration (config.residual picks POLY5);
        `model` overrides it (tests and benchmarks)."""
        if model is None:
            model = POLY5 if config.residual == "poly5" else config.residual_model
        return cls(model, OptimizerSettings.of(config), config.l2)

    @property
    def polynomial(self) -> PolynomialResidual | None:
        return self.model if isinstance(self.model, PolynomialResidual) else None

    @property
    def loss_model(self) -> ResidualModel:
        """The model whose loss the loss check computes (Taylor or linear)."""
        if isinstance(self.model, PolynomialResidual):
            raise FailedPrecondition("loss: the loss check is not computed with the polynomial residual")
        return self.model


@dataclass(frozen=True)
class PartyInfo:
    """A party as the others know it: its name, public key and feature count
    (for A, without the intercept column)."""

    name: str
    key: PublicKey
    features: int


@dataclass(frozen=True)
class GradientReply:
    """B_j's answer in step 3: A's masked gradient decrypted under pk_j, and
    B_j's own masked gradients keyed by the owner of the key each is under."""

    z_active: list[int]
    gradients: Mapping[str, CipherVector]


class PassivePort(Protocol):
    """What A's session asks of one passive party, in protocol terms.
    `exchange_score_powers` (step 0) is asked only with the polynomial residual."""

    def exchange_score_powers(self, t: int, rows: Sequence[int], powers: CipherVector) -> CipherVector: ...

    def exchange_residual_shares(self, t: int, rows: Sequence[int], a_enc: CipherVector) -> CipherVector: ...

    def exchange_masked_gradients(
        self, t: int, active_gradient: CipherVector, peer_shares: Mapping[str, CipherVector]
    ) -> GradientReply: ...

    def decrypt_peer_gradients(self, t: int, gradients: Mapping[str, CipherVector]) -> Mapping[str, list[int]]: ...

    def apply_gradient(self, t: int, decryptions: Mapping[str, list[int]]) -> None: ...

    # Loss check (optional, after step 3 and before step 5 of an iteration).
    def loss_cross_terms(self, t: int) -> Mapping[str, CipherVector]: ...

    def decrypt_loss_terms(self, t: int, terms: Mapping[str, CipherVector]) -> None: ...

    def loss_share(self, t: int) -> CipherVector: ...


def _digest(*parts: object) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, CipherVector):
            # Fixed width per ciphertext: no two different vectors encode alike.
            width = p.key.cipher_width
            h.update(p.key.fingerprint + len(p).to_bytes(8, "big"))
            h.update(b"".join(v.to_bytes(width, "big") for v in p.values))
        elif isinstance(p, Mapping):
            for k in sorted(p):
                h.update(str(k).encode() + b"=")
                h.update(_digest(p[k]))
        else:
            h.update(repr(p).encode())
        h.update(b";")
    return h.digest()


def sequential(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """The default fan-out: one passive party after the other (a service
    passes an executor's map to call them concurrently)."""
    return [fn(i) for i in items]


def _check_polynomial(plan: TrainingPlan, keys: Mapping[str, PublicKey], passive_count: int) -> None:
    """The polynomial residual: one passive party, keys large enough."""
    model = plan.polynomial
    if model is None:
        return
    if passive_count != 1:
        raise InvalidArgument(
            f"residual {model.name}: one passive party only (got {passive_count}); its cross terms between "
            "passive parties are not implemented"
        )
    for name, key in keys.items():
        steps.check_poly_key(key, model, name)


def _require_parties(given: Iterable[str], expected: Iterable[str], what: str) -> None:
    g, e = sorted(given), sorted(expected)
    if g != e:
        raise InvalidArgument(f"{what}: expected values for parties {e}, got {g}")


# --- B_j ---------------------------------------------------------------------


@dataclass
class _PassiveStep0:
    """Step 0 of an iteration at B (polynomial residual): the request, the
    answer [[cross + s]]_A, and B's share own(u_B) - s (s is only in it)."""

    t: int
    rows: np.ndarray
    request: bytes
    reply: CipherVector
    share: list[int]


@dataclass
class _PassiveIteration:
    t: int
    rows: np.ndarray
    request: bytes
    b: np.ndarray
    b_enc: CipherVector
    a_enc: CipherVector
    gradients_request: bytes = b""
    gradients_reply: GradientReply | None = None
    masks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    decrypt_request: bytes = b""
    decrypt_reply: dict[str, list[int]] | None = None
    peer_shares: Mapping[str, CipherVector] = field(default_factory=dict)
    loss_terms: dict[str, CipherVector] | None = None
    loss_masks: int = 0  # the sum of the masks this party put on its cross terms
    loss_request: bytes = b""
    loss_received: int | None = None  # the sum of the masked cross terms it decrypted
    loss_reply: CipherVector | None = None


class PassiveSession:
    """B_j's half of training. Enforces the step order and the one-decryption
    rule: per iteration it decrypts one vector for A and one for each other
    passive party, of the expected length under its own key; an identical
    retry is answered by replay, anything else is refused."""

    def __init__(
        self,
        me: str,
        backend: HEBackend,
        key: PrivateKey,
        x: np.ndarray,
        w0: np.ndarray,
        plan: TrainingPlan,
        active: PartyInfo,
        peers: Sequence[PartyInfo],
    ) -> None:
        if any(p.name in (me, ACTIVE) for p in peers) or len({p.name for p in peers}) != len(peers):
            raise InvalidArgument("peers: each passive party once, by a name that is neither this party's nor A's")
        self.me, self.backend, self.key, self.plan = me, backend, key, plan
        self.x, self.w = x, np.asarray(w0, dtype=np.float64)
        self.active, self.peers = active, {p.name: p for p in peers}
        self.optimizer: OptimizerState | None = None
        self.next_iteration = 0
        self._it: _PassiveIteration | None = None
        self._step0: _PassiveStep0 | None = None
        self._applied: tuple[int, bytes] | None = None  # the last step 5: (t, request digest)
        _check_polynomial(plan, {ACTIVE: active.key, me: key.public}, 1 + len(peers))

    def _current(self, t: int, step: str) -> _PassiveIteration:
        it = self._it
        if it is None or it.t != t:
            raise FailedPrecondition(
                f"iteration: {step} for iteration {t}, but B is at iteration {self.next_iteration}"
            )
        return it

    def _rows(self, rows: Sequence[int]) -> np.ndarray:
        idx = np.asarray(rows, dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= len(self.x):
            raise InvalidArgument(f"rows: expected positions in [0, {len(self.x)})")
        return idx

    def exchange_score_powers(self, t: int, rows: Sequence[int], powers: CipherVector) -> CipherVector:
        """Step 0 at B (polynomial residual): [[cross + s]]_A for the batch's
        rows, given [[u_A^i]]_A, with a fresh mask s that B keeps in its share.
        Once per iteration, before steps 1-2; an identical retry is replayed."""
        model = self.plan.polynomial
        if model is None:
            raise FailedPrecondition(f"step 0: the job's residual is {self.plan.model.name}, not a polynomial")
        request = _digest("step 0", t, list(rows), powers)
        s0 = self._step0
        if s0 is not None and s0.t == t:
            if s0.request != request:
                raise FailedPrecondition(f"iteration {t}: a second, different request for its cross terms")
            return s0.reply  # a retry: the same answer
        if t != self.next_iteration:
            raise FailedPrecondition(f"iteration: expected {self.next_iteration}, got {t}")
        idx = self._rows(rows)
        powers.require_key(self.active.key, "[[u_A^i]]_A")
        powers.require_length((model.degree - 1) * len(idx), "[[u_A^i]]_A")
        u_b = self.x[idx] @ self.w
        masked = steps.masked_cross_terms(self.backend, powers, u_b, model)
        share = steps.passive_poly_share(u_b, masked.mask, model)
        self._step0 = _PassiveStep0(t, idx, request, masked.ciphers, share)
        return masked.ciphers

    def exchange_residual_shares(self, t: int, rows: Sequence[int], a_enc: CipherVector) -> CipherVector:
        """Steps 1-2 at B_j: [[b_j]]_j for the batch's rows, given [[a]]_A
        (with the polynomial residual, b_j from this iteration's step 0)."""
        request = _digest(t, list(rows), a_enc)
        if self._it is not None and self._it.t == t:
            if self._it.request != request:
                raise FailedPrecondition(f"iteration {t}: a second, different request for its residual shares")
            return self._it.b_enc  # a retry: the same answer
        if t != self.next_iteration:
            raise FailedPrecondition(f"iteration: expected {self.next_iteration}, got {t}")
        idx = self._rows(rows)
        a_enc.require_key(self.active.key, "[[a_S]]_A")
        a_enc.require_length(len(idx), "[[a_S]]_A")
        model = self.plan.model
        if isinstance(model, PolynomialResidual):
            s0 = self._step0
            if s0 is None or s0.t != t:
                raise FailedPrecondition(f"iteration {t}: steps 1-2 before step 0 (the polynomial residual)")
            if not np.array_equal(s0.rows, idx):
                raise InvalidArgument(f"rows: iteration {t}'s step 0 was for other rows")
            b = np.array(s0.share, dtype=object)
            b_enc = steps.encrypt_integer_share(self.backend, self.key.public, s0.share, model)
        else:
            b = steps.passive_residual_share(self.x[idx], self.w, model)
            b_enc = steps.first_intermediate_share(self.backend, self.key.public, b)
        self._it = _PassiveIteration(t, idx, request, b, b_enc, a_enc)
        return b_enc

    def exchange_masked_gradients(
        self, t: int, active_gradient: CipherVector, peer_shares: Mapping[str, CipherVector]
    ) -> GradientReply:
        """Step 3 at B_j (and step 4 of A's masked gradient): decrypt
        [[X_A^T b_j + R_Aj]]_j once; compute [[X_j^T s_Q + R_jQ]]_Q for A and
        every other passive party Q."""
        it = self._current(t, "step 3")
        request = _digest(active_gradient, peer_shares)
        if it.gradients_reply is not None:
            if it.gradients_request != request:
                raise FailedPrecondition(f"iteration {t}: a second, different masked gradient to decrypt")
            return it.gradients_reply
        _require_parties(peer_shares, self.peers, "peer_shares")
        for name, share in peer_shares.items():
            share.require_key(self.peers[name].key, f"[[b_S]] of {name}")
            share.require_length(len(it.rows), f"[[b_S]] of {name}")
        model = self.plan.model
        z_active = steps.decrypt_masked_gradient(
            self.backend, self.key, active_gradient, self.active.features + 1, model
        )
        x = self.x[it.rows]
        masked = {ACTIVE: steps.masked_encrypted_gradient(self.backend, x, it.a_enc, model)}
        for name, share in peer_shares.items():
            masked[name] = steps.masked_encrypted_gradient(self.backend, x, share, model)
        it.masks = {q: g.mask for q, g in masked.items()}
        it.peer_shares = dict(peer_shares)
        it.gradients_request = request
        it.gradients_reply = GradientReply(z_active, {q: g.ciphers for q, g in masked.items()})
        return it.gradients_reply

    def decrypt_peer_gradients(self, t: int, gradients: Mapping[str, CipherVector]) -> dict[str, list[int]]:
        """Step 4 at B_l for the other passive parties: decrypt each one's
        masked gradient under pk_l, once per iteration."""
        it = self._current(t, "step 4")
        if it.gradients_reply is None:
            raise FailedPrecondition(f"iteration {t}: step 4 before step 3")
        request = _digest(gradients)
        if it.decrypt_reply is not None:
            if it.decrypt_request != request:
                raise FailedPrecondition(f"iteration {t}: a second, different set of masked gradients to decrypt")
            return it.decrypt_reply
        _require_parties(gradients, self.peers, "gradients")
        reply = {
            name: steps.decrypt_masked_gradient(self.backend, self.key, c, self.peers[name].features, self.plan.model)
            for name, c in gradients.items()
        }
        it.decrypt_request, it.decrypt_reply = request, reply
        return reply

    # --- loss check: PROTOCOL.md's loss, with a cross term for every pair of passive parties

    def _later(self) -> list[str]:
        return sorted(n for n in self.peers if n > self.me)

    def _earlier(self) -> list[str]:
        return sorted(n for n in self.peers if n < self.me)

    def loss_cross_terms(self, t: int) -> dict[str, CipherVector]:
        """For every passive party l after this one (by name):
        [[sum_i u_j,i b_l,i + r_jl]]_l, from the [[b_l]]_l relayed in step 3."""
        it = self._current(t, "loss check")
        if it.gradients_reply is None:
            raise FailedPrecondition(f"iteration {t}: the loss check before step 3")
        if it.loss_terms is None:
            u = self.plan.loss_model.passive_score(it.b)
            terms, masks = {}, 0
            for name in self._later():
                terms[name], mask = steps.pair_loss_term(self.backend, u, it.peer_shares[name])
                masks += mask
            it.loss_terms, it.loss_masks = terms, masks
        return it.loss_terms

    def decrypt_loss_terms(self, t: int, terms: Mapping[str, CipherVector]) -> None:
        """The masked cross terms of the passive parties before this one,
        under its key: decrypted once per iteration, kept (never sent)."""
        it = self._current(t, "loss check")
        if it.gradients_reply is None:
            raise FailedPrecondition(f"iteration {t}: the loss check before step 3")
        request = _digest(terms)
        if it.loss_received is not None:
            if request != it.loss_request:
                raise FailedPrecondition(f"iteration {t}: a second, different set of loss terms to decrypt")
            return
        _require_parties(terms, self._earlier(), "loss terms")
        m = len(it.rows)
        it.loss_received = sum(steps.decrypt_pair_loss_term(self.backend, self.key, c, m) for c in terms.values())
        it.loss_request = request

    def loss_share(self, t: int) -> CipherVector:
        """[[sum_i a_i u_j,i + c sum_i u_j,i^2 + (decrypted terms) - (own masks)]]_A."""
        it = self._current(t, "loss check")
        if it.loss_reply is None:
            if (self._later() and it.loss_terms is None) or (self._earlier() and it.loss_received is None):
                raise FailedPrecondition(f"iteration {t}: the loss share before the cross terms")
            adjustment = (it.loss_received or 0) - it.loss_masks
            model = self.plan.loss_model
            it.loss_reply = steps.passive_loss_share_adjusted(
                self.backend, it.a_enc, model.passive_score(it.b), adjustment, model
            )
        return it.loss_reply

    def apply_gradient(self, t: int, decryptions: Mapping[str, list[int]]) -> None:
        """Step 5 at B_j: remove its masks from every key owner's decryption,
        add X_j^T b_j, update w_j. An identical retry of the step 5 just
        applied is answered as done (A lost the answer); nothing is applied twice."""
        request = _digest("step 5", decryptions)
        if self._applied == (t, request) and self.next_iteration == t + 1:
            return
        it = self._current(t, "step 5")
        if it.gradients_reply is None or (self.peers and it.decrypt_reply is None):
            raise FailedPrecondition(f"iteration {t}: step 5 before steps 3-4")
        _require_parties(decryptions, [ACTIVE, *self.peers], "decryptions")
        keys = {ACTIVE: self.active.key, **{n: p.key for n, p in self.peers.items()}}
        received = [steps.Decryption(decryptions[q], it.masks[q], keys[q]) for q in sorted(decryptions)]
        model = self.plan.polynomial
        if model is not None:
            self.w, self.optimizer = steps.update_own_weights_exact(
                received,
                self.x[it.rows],
                it.b.tolist(),
                self.w,
                penalised=np.ones(len(self.w)),
                l2=self.plan.l2,
                optimizer=self.plan.optimizer,
                state=self.optimizer,
                model=model,
            )
        else:
            self.w, self.optimizer = steps.update_own_weights(
                received,
                self.x[it.rows],
                it.b,
                self.w,
                penalised=np.ones(len(self.w)),
                l2=self.plan.l2,
                noise_std=0.0,
                optimizer=self.plan.optimizer,
                state=self.optimizer,
            )
        self.next_iteration, self._it, self._step0 = t + 1, None, None
        self._applied = (t, request)


# --- A -----------------------------------------------------------------------


@dataclass
class _ActiveIteration:
    """What A computed and received in iteration t so far: kept until the
    iteration ends, so that a repeated call re-sends the same requests."""

    t: int
    rows: np.ndarray
    a: np.ndarray | None = None
    a_enc: CipherVector | None = None
    shares: dict[str, CipherVector] | None = None
    mine: dict[str, steps.MaskedGradient] | None = None
    replies: dict[str, GradientReply] | None = None
    loss: float | None = None
    for_passive: dict[str, dict[str, list[int]]] | None = None


class ActiveSession:
    """A's half of training: drives each iteration through one port per
    passive party and routes what passive parties send each other."""

    def __init__(
        self,
        backend: HEBackend,
        key: PrivateKey,
        x: np.ndarray,
        y: np.ndarray,
        w0: np.ndarray,
        plan: TrainingPlan,
        passive: Sequence[PartyInfo],
        ports: Mapping[str, PassivePort],
        fan_out: Callable[[Callable[[str], object], Iterable[str]], list[object]] = sequential,
    ) -> None:
        """x: A's standardised rows with the intercept column last."""
        if not passive:
            raise InvalidArgument("passive parties: at least one")
        _require_parties(ports, [p.name for p in passive], "ports")
        if ACTIVE in ports or len(ports) != len(passive):
            raise InvalidArgument(f"passive parties: distinct names other than {ACTIVE!r}")
        self.backend, self.key, self.plan = backend, key, plan
        self.x, self.y, self.w = x, y, np.asarray(w0, dtype=np.float64)
        self.passive = {p.name: p for p in passive}
        self.ports = ports
        self.fan_out = fan_out
        self.optimizer: OptimizerState | None = None
        self.next_iteration = 0
        self._it: _ActiveIteration | None = None
        _check_polynomial(plan, {ACTIVE: key.public, **{p.name: p.key for p in passive}}, len(passive))

    def _each(self, fn: Callable[[str], T]) -> dict[str, T]:
        names = sorted(self.passive)
        return dict(zip(names, self.fan_out(fn, names), strict=True))  # type: ignore[arg-type]

    def iteration(self, t: int, rows: Sequence[int], check_loss: bool = False) -> float | None:
        """One iteration of the pairwise protocol on the batch `rows`; with
        `check_loss`, the batch's loss under the weights before this
        iteration's update (else None).

        A call that fails part-way (a party unreachable) may be repeated for
        the same t: what was computed is kept, every request is re-sent as it
        was (each passive party answers an identical request by replay, so
        nothing is decrypted twice), and A's own update is made once, after
        every party's step 5 went through."""
        if t != self.next_iteration:
            raise FailedPrecondition(f"iteration: expected {self.next_iteration}, got {t}")
        idx = np.asarray(rows, dtype=np.int64)
        it = self._it
        if it is None or it.t != t:
            it = self._it = _ActiveIteration(t, idx)
        elif not np.array_equal(it.rows, idx):
            raise InvalidArgument(f"rows: iteration {t} was started on other rows")
        x, y = self.x[idx], self.y[idx]
        m = len(idx)
        model = self.plan.model
        if it.a_enc is None:
            if isinstance(model, PolynomialResidual):
                # Step 0: A's share from [[cross + s]]_A, then steps 1-2 on it.
                a_int = self._step0(t, idx, x, y, model)
                it.a = np.array(a_int, dtype=object)
                it.a_enc = steps.encrypt_integer_share(self.backend, self.key.public, a_int, model)
            else:
                # Steps 1-2.
                it.a = steps.active_residual_share(x, self.w, y, model)
                it.a_enc = steps.first_encrypted_data(self.backend, self.key.public, it.a)
        a_enc, a = it.a_enc, it.a
        assert a is not None
        if it.shares is None:
            shares = self._each(lambda j: self.ports[j].exchange_residual_shares(t, idx.tolist(), a_enc))
            for j, share in shares.items():
                share.require_key(self.passive[j].key, f"[[b_S]] of {j}")
                share.require_length(m, f"[[b_S]] of {j}")
            it.shares = shares
            # Step 3: A's masked gradient for each B_j (fresh masks, once per iteration).
            it.mine = {
                j: steps.masked_encrypted_gradient(self.backend, x, shares[j], model) for j in sorted(self.passive)
            }
        shares, mine = it.shares, it.mine
        assert mine is not None
        if it.replies is None:
            # Step 3, and the relay of the other passive parties' shares.
            replies = self._each(
                lambda j: self.ports[j].exchange_masked_gradients(
                    t, mine[j].ciphers, {q: s for q, s in shares.items() if q != j}
                )
            )
            for j, reply in replies.items():
                expected = [ACTIVE, *(q for q in self.passive if q != j)]
                _require_parties(reply.gradients, expected, f"gradients of {j}")
                for owner, c in reply.gradients.items():
                    c.require_key(self.key.public if owner == ACTIVE else self.passive[owner].key, f"gradient of {j}")
            it.replies = replies
        replies = it.replies
        if check_loss and it.loss is None:
            it.loss = self._loss(t, x @ self.w, y)
        if it.for_passive is None:
            # Step 4: A decrypts what is under pk_A; each B_l what the others put under pk_l.
            decrypted = self._each(
                lambda owner: self.ports[owner].decrypt_peer_gradients(
                    t, {j: r.gradients[owner] for j, r in replies.items() if j != owner}
                )
            )
            for owner, zs in decrypted.items():
                _require_parties(zs, [q for q in self.passive if q != owner], f"decryptions of {owner}")
            it.for_passive = {
                j: {
                    ACTIVE: steps.decrypt_masked_gradient(
                        self.backend, self.key, replies[j].gradients[ACTIVE], self.passive[j].features, model
                    ),
                    **{owner: zs[j] for owner, zs in decrypted.items() if owner != j},
                }
                for j in sorted(self.passive)
            }
        for_passive = it.for_passive
        # Step 5: each B_j's update (replayed by B_j on a retry), then A's own.
        self._each(lambda j: self.ports[j].apply_gradient(t, for_passive[j]))
        received = [steps.Decryption(replies[j].z_active, mine[j].mask, self.passive[j].key) for j in sorted(mine)]
        penalised = np.r_[np.ones(len(self.w) - 1), 0.0]  # not the intercept
        if isinstance(model, PolynomialResidual):
            self.w, self.optimizer = steps.update_own_weights_exact(
                received,
                x,
                a.tolist(),
                self.w,
                penalised=penalised,
                l2=self.plan.l2,
                optimizer=self.plan.optimizer,
                state=self.optimizer,
                model=model,
            )
        else:
            self.w, self.optimizer = steps.update_own_weights(
                received,
                x,
                a,
                self.w,
                penalised=penalised,
                l2=self.plan.l2,
                noise_std=0.0,
                optimizer=self.plan.optimizer,
                state=self.optimizer,
            )
        self.next_iteration, self._it = t + 1, None
        return it.loss

    def _loss(self, t: int, u_a: np.ndarray, y: np.ndarray) -> float:
        """The loss check: each B_j's cross terms with the passive parties
        after it, relayed to their key owners; each B_j's share under pk_A;
        A decrypts their sum, one scalar."""
        model = self.plan.loss_model
        names = sorted(self.passive)
        terms = self._each(lambda j: self.ports[j].loss_cross_terms(t))
        for j, by_owner in terms.items():
            _require_parties(by_owner, [n for n in names if n > j], f"loss terms of {j}")
            for owner, c in by_owner.items():
                c.require_key(self.passive[owner].key, f"loss term of {j}")
        self._each(
            lambda owner: self.ports[owner].decrypt_loss_terms(t, {j: terms[j][owner] for j in names if j < owner})
        )
        shares = self._each(lambda j: self.ports[j].loss_share(t))
        total: CipherVector | None = None
        for j, c in shares.items():
            c.require_key(self.key.public, f"loss share of {j}")
            c.require_length(1, f"loss share of {j}")
            total = c if total is None else self.backend.add(total, c)
        assert total is not None
        k = len(names)
        return steps.active_loss(u_a, y, total, self.backend, self.key, model, terms=k + k * (k - 1) // 2)

    def _step0(self, t: int, idx: np.ndarray, x: np.ndarray, y: np.ndarray, model: PolynomialResidual) -> list[int]:
        """Step 0 (polynomial residual, one passive party): [[u_A^i]]_A out,
        [[cross + s]]_A back, decrypted (range-checked) into A's share."""
        u_a = x @ self.w
        powers = steps.encrypted_score_powers(self.backend, self.key.public, u_a, model)
        masked = self._each(lambda j: self.ports[j].exchange_score_powers(t, idx.tolist(), powers))
        (reply,) = masked.values()
        return steps.active_poly_share(self.backend, self.key, reply, u_a, y, model)

    def scores(self, x: np.ndarray, w: np.ndarray, ports: Mapping[str, PredictionPort]) -> np.ndarray:
        """Prediction with the session's parties (see `combined_scores`)."""
        _require_parties(ports, self.passive, "ports")
        return combined_scores(self.backend, self.key, self.plan.model, x @ w, ports, self.fan_out)


def combined_scores(
    backend: HEBackend,
    key: PrivateKey,
    model: ResidualModel | PolynomialResidual,
    u_a: np.ndarray,
    ports: Mapping[str, PredictionPort],
    fan_out: Callable[[Callable[[str], object], Iterable[str]], list[object]] = sequential,
) -> np.ndarray:
    """Prediction with k passive parties: [[u_A]]_A to each B_j, which
    returns [[u_A + u_j]]_A re-randomised; A combines them under its key,
    sum_j [[u_A + u_j]] - (k - 1) [[u_A]], and decrypts the total once."""
    if not ports:
        raise InvalidArgument("ports: at least one passive party")
    enc = steps.third_encrypted_data(backend, key.public, u_a)
    names = sorted(ports)
    replies = dict(zip(names, fan_out(lambda j: ports[j].predict_scores(enc), names), strict=True))
    total: CipherVector | None = None
    for j, c in replies.items():
        assert isinstance(c, CipherVector)
        c.require_key(key.public, f"scores of {j}")
        c.require_length(len(u_a), f"scores of {j}")
        total = c if total is None else backend.add(total, c)
    assert total is not None
    if len(replies) > 1:
        minus = steps.encrypt_share(backend, key.public, -(len(replies) - 1) * u_a)
        total = backend.add(total, minus)
    return steps.decrypt_prediction(backend, key, total, len(u_a), model)


class PredictionPort(Protocol):
    def predict_scores(self, u_active_enc: CipherVector) -> CipherVector: ...


def passive_scores(backend: HEBackend, x: np.ndarray, w: np.ndarray, u_active_enc: CipherVector) -> CipherVector:
    """Prediction at B_j: [[u_A + u_j]]_A, re-randomised."""
    if len(u_active_enc) != len(x):
        raise OutOfRange(f"[[u_A]]_A: expected {len(x)} values, got {len(u_active_enc)}")
    return steps.target_prediction_data(backend, u_active_enc, x @ w)
