"""Shared fixtures: a local federation (each party its own process, real gRPC
over loopback, real Paillier keys) and the bundled breast split."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE, split_ids
from vfl.common.crypto.backend import PrivateKey
from vfl.common.crypto.keystore import key_path
from vfl.common.crypto.keystore import read_private_key as read_key_file
from vfl.common.storage import read_record

# Test mode only (OU needs at least 768 bits); one end-to-end test runs 2048-bit keys.
TEST_KEY_BITS = 1024


@dataclass
class BreastSplit:
    train_ids: list[str]
    test_ids: list[str]
    labels: dict[str, float]


@pytest.fixture(scope="session")
def breast() -> BreastSplit:
    train, test, labels = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    return BreastSplit(train, test, labels)


# B's policy for functional tests (see make_federation).
RELAXED_POLICY = {"VFL_MAX_MODELS_PER_PEER": "1000", "VFL_PREDICT_SCOPE": "any", "VFL_MIN_ITERATIONS": "1"}
# For tests that compare two runs of one job: each party draws its initial
# weights from its own test-mode seed instead of its CSPRNG, so the runs agree.
SAME_START = {"VFL_TEST_INITIAL_WEIGHTS_SEED": "7"}


def make_federation(workdir: Path, **kwargs: object) -> LocalFederation:
    """Plaintext (VFL_INSECURE=true) unless tls=True: tests/test_tls.py covers mutual TLS.
    B's policy is relaxed where the functional tests need it (many models for
    one peer, scoring any id, short jobs); tests/attacks/ and the end-to-end
    tests of the policy run B's defaults."""
    policy = dict(RELAXED_POLICY)
    kwargs["extra_env"] = {**policy, **dict(kwargs.get("extra_env") or {})}  # type: ignore[arg-type]
    opts: dict = {
        "active_csv": BUNDLED_ACTIVE,
        "passive_csv": BUNDLED_PASSIVE,
        "key_bits": TEST_KEY_BITS,
        "assistant": True,
        "tls": False,
    }
    opts.update(kwargs)
    return LocalFederation(workdir, **opts)


def tls_client(fed: LocalFederation, identity: str = "client", timeout_s: float = 120.0) -> VflClient:
    """A client of a TLS federation's active party presenting `identity`'s
    certificate (made by the federation's CA on first use)."""
    files = fed.tls_files(identity)
    assert files is not None, "the federation runs without TLS"
    return VflClient(fed.active_address, timeout_s=timeout_s, tls=files, server_name="active")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """A, B and C with test-size keys, shared by the tests of one module."""
    with make_federation(tmp_path_factory.mktemp("fed")) as fed:
        yield fed


@pytest.fixture()
def client(federation: LocalFederation) -> Iterator[VflClient]:
    with VflClient(federation.active_address, timeout_s=120) as c:
        c.wait_ready(30)
        yield c


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """A party's CSV for a test federation."""
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        out.writerows(rows)
    return path


def read_shard(fed: LocalFederation, party: str, model_id: str) -> dict:
    return read_record(fed.workdir / party / "data" / "models" / f"{model_id}.json", "model")


def read_private_key(fed: LocalFederation, party: str) -> PrivateKey:
    """For tests that check what a party *could* decrypt from what it received."""
    return read_key_file(key_path(fed.workdir / party / "data"))


def model_arrays(shard: dict) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(shard["scaler"][k]) for k in ("mean", "scale")) + (np.asarray(shard["weights"]),)
