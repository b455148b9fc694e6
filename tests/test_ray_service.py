"""The services with VFL_COMPUTE=ray, over real gRPC, each party in its own
process: B's crypto on a two-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`), A's on a cluster of its own, and B's data
read from Parquet.

- The job's model (both shards) and its predictions are those the local
  engine gives from the CSV, bit for bit (same initial weights by the
  test-mode seed; only the masks' randomness differs); A's prediction
  decryption is split across A's workers.
- B's blocks ran on both nodes: the test attaches to the cluster and asks
  each of B's named crypto workers where it runs and how many blocks it
  answered; none of them was sent B's private key (training's decryptions
  are too small to split).
- One of B's workers SIGKILLed while the job runs: the job succeeds with the
  same model.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from tests.conftest import SAME_START, make_federation, read_shard
from vfl.cli.client import VflClient
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE, split_ids
from vfl.common.jobconfig import JobConfig
from vfl.v1 import client_pb2

CONFIG = JobConfig(epochs=3, batch_size=64, seed=5, learning_rate=0.1, l2=0.01)
JOB = "ray-job"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, namespace="vfl-test", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def active_cluster() -> Iterator[Cluster]:
    """A's own cluster (one node): each party's keys stay in its own."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def passive_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("parquet") / "passive.parquet"
    table = pacsv.read_csv(BUNDLED_PASSIVE, convert_options=pacsv.ConvertOptions(column_types={"id": "string"}))
    pq.write_table(table, path, row_group_size=100)  # several row groups: read in chunks
    return path


def _train(fed: Any, ids: list[str], during: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both shards' weights, and the model's predictions of the held-out ids."""
    with VflClient(fed.active_address, timeout_s=120) as c:
        c.wait_ready(60)
        c.start_training(CONFIG, ids, JOB)
        if during is not None:
            during(c)
        assert c.wait(JOB).state == client_pb2.JOB_STATE_SUCCEEDED
        _, test, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
        probs = c.predict(JOB, test)
    a, b = read_shard(fed, "active", JOB), read_shard(fed, "passive", JOB)
    return np.r_[a["weights"], a["intercept"]], np.asarray(b["weights"]), probs


def _ray_env(cluster: Cluster, parquet: Path) -> dict[str, dict[str, str]]:
    return {
        "passive": {
            "VFL_COMPUTE": "ray",
            "VFL_RAY_ADDRESS": cluster.address,
            "VFL_RAY_WORKERS": "2",
            # Every 64-row share and 10 x 64 product goes to the cluster.
            "VFL_RAY_MIN_BLOCK": "16",
            "VFL_DATA_CSV": str(parquet),
        }
    }


def _workers() -> list[dict[str, Any]]:
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("vfl-crypto-")]
    return ray.get([ray.get_actor(a["name"], namespace=a["namespace"]).stats.remote() for a in names])


@pytest.fixture(scope="module")
def train_ids() -> list[str]:
    train, _, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    return train


@pytest.fixture(scope="module")
def local_model(
    tmp_path_factory: pytest.TempPathFactory, train_ids: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with make_federation(tmp_path_factory.mktemp("local"), extra_env=SAME_START, assistant=False) as fed:
        return _train(fed, train_ids)


def test_both_parties_on_ray_give_the_local_model_with_blocks_on_both_nodes(
    tmp_path: Path,
    cluster: Cluster,
    active_cluster: Cluster,
    passive_parquet: Path,
    train_ids: list[str],
    local_model: Any,
) -> None:
    env = _ray_env(cluster, passive_parquet)
    env["active"] = {
        "VFL_COMPUTE": "ray",
        "VFL_RAY_ADDRESS": active_cluster.address,
        "VFL_RAY_WORKERS": "2",
        "VFL_RAY_MIN_BLOCK": "16",
    }
    with make_federation(tmp_path, extra_env=SAME_START, assistant=False, service_env=env) as fed:
        wa, wb, probs = _train(fed, train_ids)
        workers = _workers()
        assert len(workers) == 2
        assert {w["node"] for w in workers} == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert all(w["served"] > 0 for w in workers), f"blocks per worker: {[w['served'] for w in workers]}"
        # Training decrypts p values per step: too few to split, so B's private key never left its process.
        assert all(w["private_keys"] == 0 for w in workers)
        assert "event=ray_workers workers=2 nodes=2" in fed.services["passive"].log_path.read_text()
        assert "event=ray_workers workers=2 nodes=1" in fed.services["active"].log_path.read_text()
    assert np.array_equal(wa, local_model[0])
    assert np.array_equal(wb, local_model[1])
    # A's prediction decrypts 114 scores: split across A's workers, and exact.
    assert np.array_equal(probs, local_model[2])


def test_ray_worker_killed_during_a_service_job(
    tmp_path: Path, cluster: Cluster, passive_parquet: Path, train_ids: list[str], local_model: Any
) -> None:
    env = _ray_env(cluster, passive_parquet)
    killed: list[int] = []

    def kill_one(c: VflClient) -> None:
        deadline = time.time() + 60
        while c.status(JOB).iteration < 5:
            assert time.time() < deadline
            time.sleep(0.01)
        victim = _workers()[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    with make_federation(tmp_path, extra_env=SAME_START, assistant=False, service_env=env) as fed:
        wa, wb, _ = _train(fed, train_ids, during=kill_one)
        pids = {w["pid"] for w in _workers()}
        assert killed and killed[0] not in pids and len(pids) == 2, "the killed worker was replaced"
    assert np.array_equal(wa, local_model[0])
    assert np.array_equal(wb, local_model[1])
