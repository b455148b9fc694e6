"""A malicious A, played by a test over real gRPC against a real B process.

`attack_federation` builds the local federation an attack runs in (plaintext,
no assistant, 1024-bit test keys, B's default policy unless the test says
otherwise, optionally a planted regression per service: tests/attacks/planted.py).
`MaliciousActive` speaks B's PartyService with A's own data and its own key
pair, one step at a time, so that a test can follow the protocol honestly up
to the point where it deviates (other rows, crafted ciphertexts, a step out of
turn, a restart of B).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TEST_KEY_BITS
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common import serde
from vfl.common.alignments import AlignmentRecord
from vfl.common.crypto.backend import CipherVector, HEBackend, PrivateKey, PublicKey
from vfl.common.data import Scaler, load_party_csv
from vfl.common.errors import PeerError
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol import steps
from vfl.common.protocol.batching import BatchSchedule, batch_schedule, min_batch_size
from vfl.common.protocol.phases import Phase
from vfl.common.protocol.reference import with_intercept
from vfl.services.active.alignment import align_as_active
from vfl.services.active.peer import PassiveClient
from vfl.v1 import common_pb2, party_pb2


def attack_federation(
    workdir: Path, plants: dict[str, str] | None = None, backend: str = "ou", **extra_env: str
) -> LocalFederation:
    """B (and, if a test starts it, A) as separate processes with B's default
    policy: unlike tests/conftest.py's make_federation, nothing is relaxed."""
    return LocalFederation(
        workdir,
        BUNDLED_ACTIVE,
        BUNDLED_PASSIVE,
        key_bits=TEST_KEY_BITS,
        assistant=False,
        tls=False,
        extra_env={"VFL_BACKEND": backend, **extra_env},
        plants=dict(plants or {}),
    )


@dataclass(frozen=True)
class ActiveView:
    """A's own data for the job's ids: [X_A, 1] standardised, and y."""

    x: np.ndarray
    y: np.ndarray

    @property
    def p_active(self) -> int:
        return self.x.shape[1] - 1


def active_view(ids: list[str]) -> ActiveView:
    active = load_party_csv(BUNDLED_ACTIVE, "id", "y")
    assert active.labels is not None
    positions = active.positions(ids, "ids")
    x = with_intercept(Scaler.fit(active.features[positions]).transform(active.features[positions]))
    return ActiveView(x, active.labels[positions])


def passive_features(ids: list[str]) -> np.ndarray:
    """Ground truth: B's standardised features for the ids, as B computes them for a job."""
    passive = load_party_csv(BUNDLED_PASSIVE, "id")
    raw = passive.features[passive.positions(ids, "ids")]
    return Scaler.fit(raw, True).transform(raw)


def refused(fn: object, *args: object, **kwargs: object) -> PeerError:
    """The PeerError B answers a call with (the call must be refused)."""
    with pytest.raises(PeerError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value


@dataclass
class Step4:
    """What A holds after steps 3-4: B's decryption z_A of A's masked
    gradient, the mask R_A, and B's masked gradient under pk_A."""

    z_a: list[int]
    mask: tuple[int, ...]
    grad_b: CipherVector


class MaliciousActive:
    """A against B's PartyService, one step at a time, with its own key."""

    def __init__(self, address: str, key: PrivateKey, backend: HEBackend, ids: list[str]) -> None:
        self.key, self.backend, self.ids = key, backend, ids
        self.view = active_view(ids)
        self.w = np.random.default_rng(1).normal(0.0, 0.01, self.view.x.shape[1])
        self.client = PassiveClient(address, timeout_s=60)
        self.passive_key: PublicKey | None = None
        self.fp = b""
        self.job_id = ""
        self.p_passive = 0
        self.schedule: BatchSchedule | None = None
        self.alignment: AlignmentRecord | None = None

    def reconnect(self, address: str) -> None:
        """A fresh channel (after B restarted)."""
        self.client.close()
        self.client = PassiveClient(address, timeout_s=60)

    def close(self) -> None:
        self.client.close()

    def exchange_keys(self) -> PublicKey:
        self.passive_key, self.fp = self.client.exchange_keys(self.key.public, TEST_KEY_BITS)
        return self.passive_key

    def align(self, ids: list[str] | None = None, alignment_id: str = "") -> AlignmentRecord:
        """An honest private set intersection of `ids` (default: the job's
        ids) with B's, as A runs it."""
        alignment_id = alignment_id or f"attack-align-{secrets.token_hex(4)}"
        return align_as_active(self.client, alignment_id, list(self.ids if ids is None else ids))

    def rows_of(self, alignment: AlignmentRecord, ids: list[str]) -> list[int]:
        return alignment.positions(ids, "ids")

    def setup(
        self,
        config: JobConfig,
        job_id: str = "",
        alignment: AlignmentRecord | None = None,
        holdout_ids: list[str] | None = None,
    ) -> party_pb2.SetupJobReply:
        """Set up a job on the job's ids, aligned first unless `alignment` is given."""
        job_id = job_id or f"attack-{secrets.token_hex(4)}"
        self.alignment = alignment or self.align()
        rows = self.alignment.positions(self.ids, "ids")
        holdout = self.alignment.positions(holdout_ids or [], "holdout_ids")
        reply = self.client.setup_job(
            job_id, config, self.fp, self.view.p_active, self.alignment.alignment_id, rows, holdout
        )
        self.job_id, self.p_passive = job_id, int(reply.passive_features)
        floor = min_batch_size(self.view.p_active, self.p_passive, config.allow_small_batch)
        self.schedule = batch_schedule(
            len(self.ids), config.batch_size, config.epochs, config.seed, floor, config.max_iterations
        )
        return reply

    def header(self, t: int) -> common_pb2.StepHeader:
        return serde.step_header(self.job_id, t, self.fp)

    def rows(self, t: int) -> np.ndarray:
        assert self.schedule is not None
        return self.schedule[t].rows

    def encrypt_share(self, rows: np.ndarray) -> CipherVector:
        """[[a_S]]_A for the rows, from A's real weights and labels (fresh each call)."""
        a = steps.active_residual_share(self.view.x[rows], self.w, self.view.y[rows])
        return steps.first_encrypted_data(self.backend, self.key.public, a)

    def shares(self, t: int, rows: np.ndarray | None = None, a_enc: CipherVector | None = None) -> CipherVector:
        """Steps 1-2 for iteration t: [[b_S]]_B for the rows (the schedule's unless given)."""
        assert self.passive_key is not None
        rows = self.rows(t) if rows is None else rows
        a_enc = self.encrypt_share(rows) if a_enc is None else a_enc
        reply = self.client.exchange_residual_shares(
            self.header(t), rows.tolist(), a_enc, self.passive_key.cipher_width
        )
        return reply.ciphers(self.passive_key, "[[b_S]]_B")

    def gradients(
        self, t: int, b_enc: CipherVector | None, rows: np.ndarray | None = None, crafted: CipherVector | None = None
    ) -> Step4:
        """Steps 3-4: A's masked gradient [[X_A^T b + R_A]]_B (or a crafted
        vector under pk_B in its place), decrypted by B."""
        assert self.passive_key is not None
        rows = self.rows(t) if rows is None else rows
        if crafted is None:
            assert b_enc is not None
            grad = steps.masked_encrypted_gradient(self.backend, self.view.x[rows], b_enc)
            ciphers, mask = grad.ciphers, grad.mask
        else:
            ciphers, mask = crafted, ()
        width = max(self.passive_key.residue_width, self.key.public.cipher_width)
        reply = self.client.exchange_masked_gradients(self.header(t), ciphers, max(len(ciphers), self.p_passive), width)
        z_a = reply.residues(self.passive_key, "z_A")
        grad_b = reply.ciphers(self.key.public, "[[h_B + R_B]]_A")
        grad_b.require_length(self.p_passive, "[[h_B + R_B]]_A")
        return Step4(z_a, mask, grad_b)

    def apply(self, t: int, step4: Step4) -> float:
        """Step 5 at B: z_B, B's masked gradient decrypted with sk_A."""
        z_b = self.backend.decrypt(self.key, step4.grad_b)
        return self.client.apply_gradient(self.header(t), self.key.public, z_b)

    def iteration(self, t: int) -> Step4:
        """One honest iteration."""
        step4 = self.gradients(t, self.shares(t))
        self.apply(t, step4)
        return step4

    def job_state(self, t: int = 0) -> tuple[int, Phase]:
        return self.client.job_state(self.header(t))

    def finish(self, t: int, aborted: bool, keep_iteration: int | None = None) -> bool:
        return self.client.finish_job(self.header(t), aborted, keep_iteration)

    def validation(self, t: int, holdout_ids: list[str], best: int | None = None) -> CipherVector:
        """A validation check at iteration t: [[a_V]]_A of the holdout rows
        (fresh each call) and B's loss share over them."""
        view = active_view(holdout_ids)
        a = steps.active_residual_share(view.x, self.w, view.y)
        a_enc = steps.first_encrypted_data(self.backend, self.key.public, a)
        return self.client.validation_share(self.header(t), best, a_enc, self.key.public)
