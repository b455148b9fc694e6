"""Red team, the polynomial residual's step 0 (docs/POLY5.md) over gRPC: a
curious A against the real passive service. A sends [[u_A^i]]_A of scores
it chose and decrypts B's answer [[cross + s]]_A; without B's mask s the
cross terms sum_i u_A^i q_i(u_B) would hand A a polynomial in u_B per row.
With the mask, what A decrypts is far from every cross term; planting
"poly5-unmasked-cross" makes A read them exactly. A second, different step
0 for the same iteration is refused and ends the job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.attacks.harness import active_view, passive_features
from tests.conftest import TEST_KEY_BITS, BreastSplit
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common import serde
from vfl.common.crypto import get_backend
from vfl.common.crypto.fixedpoint import RESIDUAL_SCALE_BITS, signed
from vfl.common.errors import PeerError
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol import steps
from vfl.common.protocol.batching import batch_schedule, min_batch_size
from vfl.common.protocol.residual import POLY5
from vfl.services.active.alignment import align_as_active
from vfl.services.active.peer import PassiveClient

BACKEND = get_backend("ou")
CONFIG = JobConfig(batch_size=64, epochs=2, seed=4, loss_every=0, max_iterations=12, residual="poly5")
SEED = "5"  # B's test-mode initial weights, so that the test knows u_B (A never does)


def step0_reads(tmp: Path, breast: BreastSplit, plant: str | None) -> tuple[np.ndarray, np.ndarray, PeerError]:
    """(what A decoded from step 0, the true cross terms, B's answer to a second step 0)."""
    fed = LocalFederation(
        tmp / "fed",
        BUNDLED_ACTIVE,
        BUNDLED_PASSIVE,
        key_bits=TEST_KEY_BITS,
        assistant=False,
        tls=False,
        extra_env={"VFL_TEST_INITIAL_WEIGHTS_SEED": SEED},
        plants={"passive": plant} if plant else {},
    )
    fed.start("passive")
    client = PassiveClient(fed.services["passive"].address, timeout_s=60)
    try:
        key = BACKEND.generate_keypair(TEST_KEY_BITS)
        passive_key, fp = client.exchange_keys(key.public, TEST_KEY_BITS)
        record = align_as_active(client, "align-p5", breast.train_ids)
        view = active_view(list(record.ids))
        job = "attack-p5"
        client.setup_job(job, CONFIG, fp, view.p_active, record.alignment_id, list(range(record.size)), party_name="p")
        floor = min_batch_size(view.p_active, client.passive_features, False)
        schedule = batch_schedule(
            record.size, CONFIG.batch_size, CONFIG.epochs, CONFIG.seed, floor, CONFIG.max_iterations
        )
        rows = schedule[0].rows
        u_a = np.linspace(-2.0, 2.0, len(rows))  # any scores A likes
        header = serde.step_header(job, 0, fp)
        powers = steps.encrypted_score_powers(BACKEND, key.public, u_a, POLY5)
        reply = client.exchange_score_powers(header, rows.tolist(), powers).ciphers(key.public, "cross")
        raw = signed(BACKEND.decrypt(key, reply), key.plaintext_modulus)
        decoded = np.array(raw, dtype=np.float64) / 2.0 ** (2 * RESIDUAL_SCALE_BITS)
        w_b = steps.initial_weights(int(SEED), job, client.passive_features, CONFIG.init_scale)
        u_b = passive_features(list(record.ids))[rows] @ w_b
        other = steps.encrypted_score_powers(BACKEND, key.public, -u_a, POLY5)
        with pytest.raises(PeerError) as second:
            client.exchange_score_powers(header, rows.tolist(), other)
        return decoded, POLY5.cross(u_a, u_b), second.value
    finally:
        client.close()
        fed.stop()


@pytest.mark.parametrize("plant", [None, "poly5-unmasked-cross"])
def test_a_reads_only_masked_cross_terms_at_step_0(tmp_path: Path, breast: BreastSplit, plant: str | None) -> None:
    decoded, cross, second = step0_reads(tmp_path, breast, plant)
    assert second.status == "FAILED_PRECONDITION" and "second, different request" in str(second)
    if plant is None:
        assert np.min(np.abs(decoded - cross)) > 1.0, "a masked cross term decoded near the true one"
    else:
        np.testing.assert_allclose(decoded, cross, atol=1e-6)  # the planted B hands A the cross terms
