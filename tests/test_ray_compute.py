"""VFL_COMPUTE=ray on a real two-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a head and a second node, each its own raylet
and worker processes). Both parties' protocol sessions run one job; the
passive party's crypto runs on the cluster through `RayBackend`, with blocks
small enough that every encryption and product of the job is split.

- The model is the one the local engine gives, bit for bit: only the masks'
  randomness differs, and masks cancel exactly.
- The blocks ran on both nodes (each answer names the node it ran on).
- A worker killed with SIGKILL in the middle of a job is restarted by Ray, its
  block retried after the key is sent again, and the model is still the same.
- The party's private key reaches its workers only for a decryption large
  enough to split, never with an encryption under its own key.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from tests.conftest import TEST_KEY_BITS
from tests.test_sessions import breast
from vfl.common.crypto import HEBackend, get_backend
from vfl.common.crypto.backend import CipherVector, PrivateKey
from vfl.common.crypto.ray_engine import RayBackend
from vfl.common.errors import ConfigError
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.batching import batch_schedule, coalition_feature_counts, min_batch_size
from vfl.common.protocol.sessions import ACTIVE, ActiveSession, PartyInfo, PassiveSession, TrainingPlan

CONFIG = JobConfig(batch_size=64, epochs=1, learning_rate=0.1, l2=0.01, seed=5, max_iterations=6)
LOCAL = get_backend("ou")


@cache
def party_keys() -> tuple[PrivateKey, PrivateKey]:
    return LOCAL.generate_keypair(TEST_KEY_BITS), LOCAL.generate_keypair(TEST_KEY_BITS)


class KillingPort:
    """B's session; at iteration `kill_at` a thread SIGKILLs one Ray worker
    while B's step 1-2 (its share's encryption, on the cluster) is running."""

    def __init__(self, session: PassiveSession, kill: Any = None, kill_at: int = -1) -> None:
        self.session, self.kill, self.kill_at = session, kill, kill_at

    def exchange_residual_shares(self, t: int, rows: Sequence[int], a_enc: CipherVector) -> CipherVector:
        if t == self.kill_at:
            threading.Thread(target=self.kill).start()
        return self.session.exchange_residual_shares(t, rows, a_enc)

    def __getattr__(self, step: str) -> Any:
        # Every other step goes to the session as it is.
        return getattr(self.session, step)


def train(passive_backend: HEBackend, kill: Any = None, kill_at: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """One job (same keys, initial weights and batches every time); A's and
    B's weights at the end."""
    xa, y, xb = breast()
    ka, kb = party_keys()
    plan = TrainingPlan.of(CONFIG)
    rng = np.random.default_rng(3)
    w0_a, w0_b = rng.normal(0, 0.01, xa.shape[1]), rng.normal(0, 0.01, xb.shape[1])
    b_info = PartyInfo("passive", kb.public, xb.shape[1])
    a_info = PartyInfo(ACTIVE, ka.public, xa.shape[1] - 1)
    passive_backend.prepare(kb)
    session = PassiveSession("passive", passive_backend, kb, xb, w0_b, plan, a_info, [])
    port = KillingPort(session, kill, kill_at)
    active = ActiveSession(LOCAL, ka, xa, y, w0_a, plan, [b_info], {"passive": port})  # type: ignore[dict-item]
    pa, pb = coalition_feature_counts(xa.shape[1] - 1, [xb.shape[1]])
    floor = min_batch_size(pa, pb, False)
    for t, batch in enumerate(batch_schedule(len(y), CONFIG.batch_size, 1, CONFIG.seed, floor, CONFIG.max_iterations)):
        active.iteration(t, batch.rows.tolist())
    return active.w.copy(), session.w.copy()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def ray_backend(cluster: Cluster) -> Iterator[RayBackend]:
    # Blocks small enough that every encryption of a 64-row share and every
    # 30 x 64 product goes to the cluster.
    backend = RayBackend("ou", cluster.address, min_block=16, min_terms=64)
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def local_model() -> tuple[np.ndarray, np.ndarray]:
    return train(LOCAL)


def test_two_nodes_run_the_blocks_and_give_the_local_model(
    ray_backend: RayBackend, local_model: tuple[np.ndarray, np.ndarray]
) -> None:
    nodes = {node for node, _ in ray_backend.worker_processes()}
    assert len(nodes) == 2, "one crypto worker per node of the two-node cluster"
    before = sum(ray_backend.blocks_by_node.values())
    wa, wb = train(ray_backend)
    ran = ray_backend.blocks_by_node
    assert sum(ran.values()) - before >= 2 * CONFIG.max_iterations, "every iteration's share and product split"
    assert set(ran) == nodes, f"blocks ran on {len(set(ran))} of the 2 nodes"
    assert ray_backend.local_blocks == 0
    # Bit for bit: the masks differ, and cancel exactly.
    assert np.array_equal(wa, local_model[0])
    assert np.array_equal(wb, local_model[1])


def test_a_worker_killed_mid_job_gives_the_same_model(
    ray_backend: RayBackend, local_model: tuple[np.ndarray, np.ndarray]
) -> None:
    victim = ray_backend.worker_processes()[1]
    killed = threading.Event()

    def kill() -> None:
        # Into the middle of B's encryption blocks of this iteration.
        time.sleep(0.005)
        os.kill(victim[1], signal.SIGKILL)
        killed.set()

    retried = ray_backend.retried_blocks
    wa, wb = train(ray_backend, kill=kill, kill_at=2)
    assert killed.wait(5)
    assert victim not in ray_backend.worker_processes(), "the killed worker was replaced"
    assert len(ray_backend.worker_processes()) == 2
    assert ray_backend.retried_blocks > retried, "a block of the killed worker was tried again"
    assert np.array_equal(wa, local_model[0])
    assert np.array_equal(wb, local_model[1])


def test_private_key_goes_to_the_workers_only_for_a_split_decryption(ray_backend: RayBackend) -> None:
    sk = LOCAL.generate_keypair(TEST_KEY_BITS)
    ray_backend.prepare(sk)

    def private_keys() -> int:
        return sum(w["private_keys"] for w in ray_backend.worker_stats())

    before = private_keys()
    values = list(range(100))
    ciphers = ray_backend.encrypt(sk.public, values)  # under the party's own key, split
    assert LOCAL.decrypt(sk, ciphers) == values
    assert private_keys() == before, "an encryption sent the private key"
    assert ray_backend.decrypt(sk, CipherVector(sk.public, ciphers.values[:8])) == values[:8]  # small: in-process
    assert private_keys() == before
    assert ray_backend.decrypt(sk, ciphers) == values  # large: split across the workers
    assert private_keys() == before + 2


def test_workers_that_cannot_be_placed_fail_start_up_in_one_line(ray_backend: RayBackend) -> None:
    # The cluster's 2 CPUs are taken by ray_backend's workers: 3 more cannot be placed.
    with pytest.raises(ConfigError, match=r"VFL_RAY_WORKERS: 3 workers of 1 CPU each were not placed within 2 s"):
        RayBackend("ou", None, workers=3, start_timeout_s=2)
    assert len(ray_backend.worker_processes()) == 2
