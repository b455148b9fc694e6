"""A's operator tools (GetModel, ListJobs, CancelJob, the report, the
estimator) over real gRPC with mutual TLS, each party its own process.

Attacks:
- a curious client of A reads everything GetModel, ListModels and ListJobs
  return and looks for B's part of the model: no value it receives is one of
  B's weights or B's scaler statistics (A never has them to give);
- a malicious passive party presents its own certificate to A's client API
  to read A's model, list A's jobs or cancel them: refused before any
  handler runs.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from tests.conftest import make_federation, read_shard, tls_client
from vfl.cli.main import BUNDLED_ACTIVE, split_ids
from vfl.common.jobconfig import JobConfig
from vfl.v1 import client_pb2


def _numbers(msg: Message) -> list[float]:
    """Every float in a message, recursively (repeated fields and maps too)."""
    out: list[float] = []
    for field, value in msg.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            values = list(value.values())
        else:
            values = list(value) if field.is_repeated else [value]
        for v in values:
            if isinstance(v, Message):
                out += _numbers(v)
            elif isinstance(v, float):
                out.append(v)
    return out


def test_a_client_of_a_never_receives_bs_part_of_the_model(tmp_path: Path) -> None:
    train, test, _ = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    with make_federation(tmp_path, tls=True) as fed, tls_client(fed) as c:
        c.wait_ready(30)
        final = c.wait(c.start_training(JobConfig(epochs=1, batch_size=64, seed=2), train, "m", test).job_id)
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED
        received = _numbers(c.model("m")) + _numbers(client_pb2.ListModelsReply(models=c.list_models()))
        received += _numbers(client_pb2.ListJobsReply(jobs=c.list_jobs()))
        b = read_shard(fed, "passive", "m")
        secret = np.r_[b["weights"], b["scaler"]["mean"], b["scaler"]["scale"]]
        a = read_shard(fed, "active", "m")
        assert len(received) > len(a["weights"]), "the reply carries A's model: the check looks at real numbers"
        got = np.asarray(received)
        close = [float(v) for v in secret if np.isclose(got, v, rtol=1e-9, atol=0).any() and abs(v) > 1e-12]
        assert close == [], f"values of B's shard reached A's client: {close[:3]}"

        with tls_client(fed, "passive") as b_as_client:
            for call in (
                lambda: b_as_client.model("m"),
                b_as_client.list_jobs,
                lambda: b_as_client.cancel("m"),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
