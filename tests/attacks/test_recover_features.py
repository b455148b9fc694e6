"""Attack 1 of issue [1/6]: a curious A recovers B's raw features X_B from
prediction, with only the project's own client and A's own model shards.

Prediction hands A u_B = X_B w_B for every id it scores (logit of the score
minus A's own u_A). If A can also compute w_B, k >= p_B models give X_B = U W^+.
The old code let it: B's initial weights came from the job seed, which A
chooses, and a job with learning_rate=1e-300 and one iteration left them
there. With secret weights A still learns X_B W for the models it gets, so
k >= p_B models and a few known rows of X_B give X_B by least squares: B's
model budget bounds k.

Each attack runs over real gRPC against real services (each its own
process) and must fail; its planted twin (the old seeded weights, or the old
unlimited budget) must let it succeed, which shows the test would catch the
regression.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import make_federation, read_shard
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common.data import Scaler, load_party_csv
from vfl.common.jobconfig import JobConfig
from vfl.v1 import client_pb2

ACTIVE = load_party_csv(BUNDLED_ACTIVE, "id", "y")
PASSIVE = load_party_csv(BUNDLED_PASSIVE, "id")
IDS = list(ACTIVE.ids)
P_B = PASSIVE.n_features
X_B = PASSIVE.features[PASSIVE.positions(IDS, "ids")]  # the truth A must not learn

# The old configuration, as the attacker (and the old B) had it.
OLD_POLICY = {
    "VFL_MIN_LEARNING_RATE": "0",
    "VFL_MIN_ITERATIONS": "1",
    "VFL_MAX_MODELS_PER_PEER": "1000",
    "VFL_PREDICT_SCOPE": "any",
}
# B's defaults (make_federation relaxes two of them for the functional tests).
DEFAULT_POLICY = {"VFL_MAX_MODELS_PER_PEER": "0", "VFL_PREDICT_SCOPE": "population", "VFL_MIN_ITERATIONS": "10"}


def scores_of_b(client: VflClient, fed: LocalFederation, model_id: str) -> np.ndarray:
    """u_B per id, as A gets it: the logit of the score minus A's own u_A."""
    p = np.clip(client.predict(model_id, IDS), 1e-300, 1 - 1e-16)
    shard = read_shard(fed, "active", model_id)
    x_a = Scaler.from_dict(shard["scaler"]).transform(ACTIVE.features[ACTIVE.positions(IDS, "ids")])
    u_a = x_a @ np.asarray(shard["weights"]) + shard["intercept"]
    return np.log(p) - np.log1p(-p) - u_a


def old_seeded_weights(seed: int, scale: float) -> np.ndarray:
    """What the old B started from, computable by A (it chose the seed)."""
    tag = int.from_bytes(b"passive", "big")
    return np.random.default_rng([seed, tag]).normal(0.0, scale, size=P_B)


def known_weights_attack(fed: LocalFederation, jobs: int) -> np.ndarray:
    """The attack as reported: p_B + 2 one-iteration jobs at learning rate
    1e-300 without standardisation, w_B assumed to be the seeded weights."""
    u, w = [], []
    with VflClient(fed.active_address, timeout_s=120) as c:
        c.wait_ready(30)
        for k in range(jobs):
            config = JobConfig(learning_rate=1e-300, max_iterations=1, standardize=False, seed=1000 + k, loss_every=0)
            c.start_training(config, IDS, f"probe-{k}")
            final = c.wait(f"probe-{k}")
            assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
            u.append(scores_of_b(c, fed, f"probe-{k}"))
            w.append(old_seeded_weights(1000 + k, config.init_scale))
    return np.column_stack(u) @ np.linalg.pinv(np.column_stack(w))


def rank_attack(fed: LocalFederation, max_jobs: int, known_rows: int = 40) -> tuple[np.ndarray, int]:
    """With secret weights: train legitimate models until B's budget refuses,
    score every id with each, and solve for X_B from `known_rows` rows A
    knows (least squares on [U, 1], which also absorbs B's standardisation)."""
    u = []
    with VflClient(fed.active_address, timeout_s=120) as c:
        c.wait_ready(30)
        for k in range(max_jobs):
            config = JobConfig(epochs=2, seed=2000 + k, loss_every=0)
            try:
                c.start_training(config, IDS, f"legit-{k}")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert "VFL_MAX_MODELS_PER_PEER" in exc.details()
                break
            final = c.wait(f"legit-{k}")
            assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
            u.append(scores_of_b(c, fed, f"legit-{k}"))
    design = np.column_stack([*u, np.ones(len(IDS))])
    known = np.random.default_rng(0).choice(len(IDS), known_rows, replace=False)
    transform = np.linalg.lstsq(design[known], X_B[known], rcond=None)[0]
    return design @ transform, len(u)


def relative_error(recovered: np.ndarray) -> float:
    return float(np.linalg.norm(recovered - X_B) / np.linalg.norm(X_B - X_B.mean(axis=0)))


def fraction_recovered(recovered: np.ndarray, tol: float = 1e-3) -> float:
    """Share of B's feature values A got right to within tol (relative to the column's spread)."""
    spread = X_B.std(axis=0)
    return float(np.mean(np.abs(recovered - X_B) <= tol * spread))


# --- B's policy refuses the probe jobs --------------------------------------


@pytest.fixture(scope="module")
def default_fed(tmp_path_factory: pytest.TempPathFactory):
    with make_federation(tmp_path_factory.mktemp("defaults"), assistant=False, extra_env=DEFAULT_POLICY) as fed:
        yield fed


@pytest.mark.parametrize(
    ("change", "option"),
    [({"learning_rate": 1e-300}, "VFL_MIN_LEARNING_RATE"), ({"max_iterations": 1}, "VFL_MIN_ITERATIONS")],
)
def test_probe_jobs_are_refused_by_b_policy(default_fed: LocalFederation, change: dict, option: str) -> None:
    with VflClient(default_fed.active_address, timeout_s=60) as c:
        c.wait_ready(30)
        with pytest.raises(grpc.RpcError) as refused:
            c.start_training(JobConfig(standardize=False, loss_every=0, **change), IDS, f"probe-{option[4:8]}")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert option in refused.value.details()
    assert not list((default_fed.workdir / "passive" / "data" / "models").glob("probe-*"))


# --- private initial weights: knowing the seed gives A nothing ----------------


def test_private_initial_weights_defeat_the_known_weights_attack(tmp_path: Path) -> None:
    """Even with B's old, permissive policy: w_B is B's own random draw."""
    with make_federation(tmp_path, assistant=False, extra_env=OLD_POLICY) as fed:
        recovered = known_weights_attack(fed, P_B + 2)
    assert relative_error(recovered) > 0.9
    assert fraction_recovered(recovered) < 0.01


def test_planted_seeded_initial_weights_are_caught(tmp_path: Path) -> None:
    """The same attack against B with the old seeded weights recovers all
    569 x 20 of B's features: the test above would fail."""
    with make_federation(
        tmp_path, assistant=False, extra_env=OLD_POLICY, plants={"passive": "seeded-initial-weights"}
    ) as fed:
        recovered = known_weights_attack(fed, P_B + 2)
    assert relative_error(recovered) < 1e-6
    assert fraction_recovered(recovered) == 1.0


# --- B's model budget: secret weights, but a few known rows ------------------


def test_model_budget_bounds_what_known_rows_give(default_fed: LocalFederation) -> None:
    recovered, models = rank_attack(default_fed, P_B + 2)
    assert models == max(1, P_B // 4)  # B refused the next one
    assert relative_error(recovered) > 0.5
    assert fraction_recovered(recovered) < 0.01


def test_planted_unlimited_budget_is_caught(tmp_path: Path) -> None:
    """With the old unlimited budget the same attack gets p_B + 2 models and,
    from 40 known rows, all of X_B: the test above would fail."""
    with make_federation(
        tmp_path, assistant=False, extra_env={**DEFAULT_POLICY, "VFL_MAX_MODELS_PER_PEER": "1000"}
    ) as fed:
        recovered, models = rank_attack(fed, P_B + 2)
    assert models == P_B + 2
    assert relative_error(recovered) < 1e-4
