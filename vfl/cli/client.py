"""A thin client of the active party's TrainingService, for the CLI and for
other Python systems."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import grpc
import numpy as np

from vfl.common.jobconfig import JobConfig
from vfl.common.rpc import open_channel
from vfl.common.serde import config_to_proto
from vfl.common.tls import TlsConfig, TlsFiles
from vfl.v1 import client_pb2, client_pb2_grpc

STATE_NAMES = {v: k.removeprefix("JOB_STATE_").lower() for k, v in client_pb2.JobState.items()}


class VflClient:
    """`tls`: the CA and this client's certificate and key (mutual TLS; the
    active party authorises the certificate's identity); None for a
    plaintext connection to a service run with VFL_INSECURE=true.
    `server_name`: the name the server's certificate must carry, if not the
    host of `address`."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 600.0,
        tls: TlsFiles | TlsConfig | None = None,
        server_name: str | None = None,
    ) -> None:
        config = TlsConfig.load(tls) if isinstance(tls, TlsFiles) else tls
        self._channel = open_channel(address, config, server_name)
        self.stub = client_pb2_grpc.TrainingServiceStub(self._channel)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VflClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def start_alignment(self, ids: Sequence[str] = (), alignment_id: str = "") -> client_pb2.Alignment:
        req = client_pb2.StartAlignmentRequest(alignment_id=alignment_id, ids=list(ids))
        return cast(client_pb2.Alignment, self.stub.StartAlignment(req, timeout=self.timeout_s))

    def alignment(self, alignment_id: str, include_ids: bool = False) -> client_pb2.Alignment:
        req = client_pb2.GetAlignmentRequest(alignment_id=alignment_id, include_ids=include_ids)
        return cast(client_pb2.Alignment, self.stub.GetAlignment(req, timeout=self.timeout_s))

    def list_alignments(self) -> list[client_pb2.Alignment]:
        return list(self.stub.ListAlignments(client_pb2.ListAlignmentsRequest(), timeout=self.timeout_s).alignments)

    def align(
        self, ids: Sequence[str] = (), alignment_id: str = "", poll_s: float = 0.05, include_ids: bool = False
    ) -> client_pb2.Alignment:
        """Start an alignment and wait for its end; the final Alignment (state
        SUCCEEDED or FAILED: check .state)."""
        started = self.start_alignment(ids, alignment_id)
        while True:
            now = self.alignment(started.alignment_id, include_ids)
            if now.state != client_pb2.ALIGNMENT_STATE_RUNNING:
                return now
            time.sleep(poll_s)
            poll_s = min(1.0, poll_s * 1.5)

    def start_training(
        self,
        config: JobConfig,
        train_ids: Sequence[str] = (),
        job_id: str = "",
        holdout_ids: Sequence[str] = (),
        alignment_id: str | None = None,
    ) -> client_pb2.JobStatus:
        """`alignment_id` None: align A's ids with B's first (a new private
        set intersection), and train on that alignment."""
        if alignment_id is None:
            aligned = self.align()
            if aligned.state != client_pb2.ALIGNMENT_STATE_SUCCEEDED:
                raise RuntimeError(f"alignment {aligned.alignment_id} failed: {aligned.error}")
            alignment_id = aligned.alignment_id
        req = client_pb2.StartTrainingRequest(
            job_id=job_id,
            config=config_to_proto(config),
            train_ids=list(train_ids),
            holdout_ids=list(holdout_ids),
            alignment_id=alignment_id,
        )
        return cast(client_pb2.JobStatus, self.stub.StartTraining(req, timeout=self.timeout_s))

    def status(self, job_id: str) -> client_pb2.JobStatus:
        req = client_pb2.GetJobStatusRequest(job_id=job_id)
        return cast(client_pb2.JobStatus, self.stub.GetJobStatus(req, timeout=self.timeout_s))

    def watch(self, job_id: str) -> Iterator[client_pb2.JobEvent]:
        return cast(Iterator[client_pb2.JobEvent], self.stub.WatchJob(client_pb2.WatchJobRequest(job_id=job_id)))

    def wait(self, job_id: str, on_event: Callable[[client_pb2.JobEvent], None] | None = None) -> client_pb2.JobStatus:
        """Follow the watch stream to the job's end; return the final status."""
        for ev in self.watch(job_id):
            if on_event is not None:
                on_event(ev)
        return self.status(job_id)

    def predict(self, model_id: str, ids: Sequence[str], align_new_ids: bool = False) -> np.ndarray:
        """P(y = 1) per id; NaN where the passive party holds no row it scores
        (see predict_reply for the status of each)."""
        return np.asarray(self.predict_reply(model_id, ids, align_new_ids).probabilities)

    def predict_reply(self, model_id: str, ids: Sequence[str], align_new_ids: bool = False) -> client_pb2.PredictReply:
        req = client_pb2.PredictRequest(model_id=model_id, ids=list(ids), align_new_ids=align_new_ids)
        return cast(client_pb2.PredictReply, self.stub.Predict(req, timeout=self.timeout_s))

    def list_models(self) -> list[client_pb2.ModelInfo]:
        return list(self.stub.ListModels(client_pb2.ListModelsRequest(), timeout=self.timeout_s).models)

    def cancel(self, job_id: str) -> client_pb2.JobStatus:
        """Stop a running job; the status once it has ended (CANCELLED unless it ended first)."""
        req = client_pb2.CancelJobRequest(job_id=job_id)
        return cast(client_pb2.JobStatus, self.stub.CancelJob(req, timeout=self.timeout_s))

    def list_jobs(self) -> list[client_pb2.JobStatus]:
        return list(self.stub.ListJobs(client_pb2.ListJobsRequest(), timeout=self.timeout_s).jobs)

    def model(self, model_id: str) -> client_pb2.ModelDetail:
        req = client_pb2.GetModelRequest(model_id=model_id)
        return cast(client_pb2.ModelDetail, self.stub.GetModel(req, timeout=self.timeout_s))
