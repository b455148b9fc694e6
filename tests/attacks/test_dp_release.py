"""Attack 4 of issue [1/6]: differential privacy that protects against the
peer. The party that releases a value adds the noise: B to z_A (protecting
X_B from A), A to z_B (protecting y from B). Noise a party adds to its own
gradient after it has seen the exact cross term protects nothing.

1. A malicious A isolates B's per-sample scores: at step 3 it sends
   [[S^T b + R]]_B with S a selection matrix (unit rows) instead of its
   features, so that B's decryption hands it b_i = x_B,i . w_B / 4 for
   p_A + 1 rows of the batch. With DP each value carries B's noise, of the
   calibrated scale, and its sign is right at chance.
2. A curious B writes down its unmasked cross term X_B^T a at step 5 (a plant
   that only logs, the adversary): with DP it deviates from the exact value,
   which the test computes from both parties' own records, by A's noise.

The planted twins (the releasing party adds no noise) give the exact values:
the tests would catch the regression.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from tests.attacks.harness import MaliciousActive, active_view, attack_federation, passive_features
from tests.conftest import TEST_KEY_BITS, make_federation, read_shard
from vfl.cli.client import VflClient
from vfl.cli.main import BUNDLED_ACTIVE, split_ids
from vfl.common import dp
from vfl.common.crypto import get_backend
from vfl.common.crypto.backend import unmask
from vfl.common.crypto.fixedpoint import FEATURE_SCALE_BITS, RESIDUAL_SCALE_BITS, signed
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol import steps
from vfl.common.protocol.batching import batch_schedule, min_batch_size
from vfl.common.storage import read_record
from vfl.services.passive.policy import PassivePolicy
from vfl.v1 import client_pb2

TRAIN_IDS, _, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
GRADIENT_SCALE = float(1 << (FEATURE_SCALE_BITS + RESIDUAL_SCALE_BITS))
EPSILON = 1.0
SHARE_CLIP = PassivePolicy().dp_share_clip
STATED_CLIP = 0.01  # what the attacker states as its row norm: the smallest noise it can get
PROBES = 10  # jobs, each probing iteration 0 (B's weights are then its own w0)


def probe_scores(workdir: Path, plants: dict[str, str]) -> tuple[np.ndarray, np.ndarray, float]:
    """(A's estimates of b_i, the true b_i, the noise std B's policy implies)."""
    backend = get_backend("ou")
    key = backend.generate_keypair(TEST_KEY_BITS)
    config = JobConfig(epochs=2, batch_size=64, seed=5, loss_every=0, dp_epsilon=EPSILON, init_scale=1.0)
    x_b = passive_features(TRAIN_IDS)
    estimates, truth = [], []
    with attack_federation(workdir, plants) as fed:
        attacker = MaliciousActive(fed.services["passive"].address, key, backend, TRAIN_IDS)
        attacker.exchange_keys()
        assert attacker.passive_key is not None
        p_a = attacker.view.p_active
        aligned = attacker.align()
        rows_in_alignment = aligned.positions(TRAIN_IDS, "ids")
        for k in range(PROBES):
            job_id = f"probe-{k}"
            reply = attacker.client.setup_job(
                job_id, config, attacker.fp, p_a, aligned.alignment_id, rows_in_alignment, (), STATED_CLIP
            )
            attacker.job_id, attacker.p_passive = job_id, int(reply.passive_features)
            floor = min_batch_size(p_a, attacker.p_passive, False)
            attacker.schedule = batch_schedule(len(TRAIN_IDS), 64, config.epochs, config.seed, floor)
            rows = attacker.rows(0)
            b_enc = attacker.shares(0)
            # The crafted "features": row j of the batch selects b_j.
            select = np.zeros((len(rows), p_a + 1))
            select[np.arange(p_a + 1), np.arange(p_a + 1)] = 1.0
            grad = steps.masked_encrypted_gradient(backend, select, b_enc)
            step4 = attacker.gradients(0, b_enc, crafted=grad.ciphers)
            values = signed(unmask(attacker.passive_key, step4.z_a, grad.mask), attacker.passive_key.n)
            estimates.extend(np.array(values, dtype=float) / GRADIENT_SCALE)
            # Ground truth from B's own record of its job (never seen by A).
            setup = read_record(fed.workdir / "passive" / "data" / "jobs" / f"{job_id}.setup.json", "job-setup")
            x = dp.clip_rows(x_b[rows[: p_a + 1]], float(reply.passive_clip_norm))
            truth.extend(np.clip(x @ np.asarray(setup["w0"]) / 4.0, -SHARE_CLIP, SHARE_CLIP))
            attacker.finish(0, aborted=True)
        attacker.close()
    releases = dp.releases_per_row(len(attacker.schedule), attacker.schedule.per_epoch)
    std = dp.noise_multiplier(EPSILON, config.dp_delta, releases) * 2 * SHARE_CLIP * np.sqrt(STATED_CLIP**2 + 1)
    return np.array(estimates), np.array(truth), float(std)


def assert_scores_hidden(estimates: np.ndarray, truth: np.ndarray, std: float) -> None:
    error = estimates - truth
    assert 0.7 < float(np.std(error)) / std < 1.4, (float(np.std(error)), std)
    right = int(np.sum(np.sign(estimates) == np.sign(truth)))
    assert binomtest(right, len(truth), 0.5).pvalue > 1e-3 and right / len(truth) < 0.65, right


def test_b_noises_what_it_decrypts_for_a(tmp_path: Path) -> None:
    estimates, truth, std = probe_scores(tmp_path, {})
    assert len(truth) == PROBES * 11
    assert_scores_hidden(estimates, truth, std)


def test_planted_unnoised_release_is_caught(tmp_path: Path) -> None:
    estimates, truth, std = probe_scores(tmp_path, {"passive": "no-release-noise-passive"})
    np.testing.assert_allclose(estimates, truth, atol=1e-9)  # A read B's scores exactly
    with pytest.raises(AssertionError):
        assert_scores_hidden(estimates, truth, std)


# --- the curious B, against A's noise on z_B ---------------------------------

CURIOUS = JobConfig(epochs=2, batch_size=64, seed=8, loss_every=0, dp_epsilon=EPSILON, max_iterations=10)


def curious_view(workdir: Path, active_plant: str | None) -> tuple[np.ndarray, float]:
    """What a curious B learns minus the exact X_B^T a of iteration 0 (two
    jobs), and A's calibrated noise std."""
    plants = {"passive": "curious-passive-view"}
    if active_plant:
        plants["active"] = active_plant
    log = workdir / "curious.jsonl"
    errors = []
    with (
        make_federation(workdir, assistant=False, plants=plants, extra_env={"VFL_CURIOUS_LOG": str(log)}) as fed,
        VflClient(fed.active_address, timeout_s=120) as c,
    ):
        c.wait_ready(30)
        for job in ("curious-0", "curious-1"):
            c.start_training(CURIOUS, TRAIN_IDS, job)
            assert c.wait(job).state == client_pb2.JOB_STATE_SUCCEEDED
            a_shard, b_shard = read_shard(fed, "active", job), read_shard(fed, "passive", job)
            view = active_view(TRAIN_IDS)
            x_a = np.hstack([dp.clip_rows(view.x[:, :-1], a_shard["dp"]["clip_norm"]), view.x[:, -1:]])
            x_b = dp.clip_rows(passive_features(TRAIN_IDS), b_shard["dp"]["clip_norm"])
            floor = min_batch_size(x_a.shape[1] - 1, x_b.shape[1], False)
            rows = batch_schedule(len(TRAIN_IDS), 64, CURIOUS.epochs, CURIOUS.seed, floor, 10)[0].rows
            a = steps.active_residual_share(x_a[rows], np.asarray(a_shard["initial_weights"]), view.y[rows])
            seen = [json.loads(line) for line in log.read_text().splitlines()]
            first = next(r for r in seen if r["job"] == job and r["iteration"] == 0)
            errors.extend(np.asarray(first["cross"]) - x_b[rows].T @ a)
        std = a_shard["dp"]["noise_multiplier"] * a_shard["dp"]["passive_clip_norm"]
    return np.array(errors), float(std)


def test_a_noises_what_it_decrypts_for_b(tmp_path: Path) -> None:
    errors, std = curious_view(tmp_path, None)
    assert 0.6 < float(np.std(errors)) / std < 1.5, (float(np.std(errors)), std)


def test_planted_unnoised_release_by_a_is_caught(tmp_path: Path) -> None:
    errors, std = curious_view(tmp_path, "no-release-noise-active")
    assert float(np.max(np.abs(errors))) < 1e-3  # B read X_B^T a exactly (to the 2^-16 feature scale)
    assert not 0.6 < float(np.std(errors)) / std < 1.5
