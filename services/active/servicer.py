"""TrainingService at A: decode, call one ActiveParty method, encode."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc

from common import serde
from common.jobconfig import job_config
from common.rpc import rpc_method
from services.active.party import ActiveParty, Event, State, TrainingJob, final_loss
from vfl.v1 import client_pb2, client_pb2_grpc

_STATES = {
    State.RUNNING: client_pb2.JOB_STATE_RUNNING,
    State.SUCCEEDED: client_pb2.JOB_STATE_SUCCEEDED,
    State.FAILED: client_pb2.JOB_STATE_FAILED,
}


def _status(job: TrainingJob) -> client_pb2.JobStatus:
    msg = client_pb2.JobStatus(
        job_id=job.job_id,
        state=_STATES[job.state],
        iteration=job.iteration,
        total_iterations=job.total,
        epoch=job.epoch,
        error=job.error,
        elapsed_s=time.time() - job.started,
    )
    if job.loss is not None:
        msg.loss = job.loss
    if job.dp_epsilon_spent is not None:
        msg.dp_epsilon_spent = job.dp_epsilon_spent
    return msg


def _event(job_id: str, ev: Event) -> client_pb2.JobEvent:
    msg = client_pb2.JobEvent(
        job_id=job_id,
        state=_STATES[ev.state],
        iteration=ev.iteration,
        total_iterations=ev.total,
        epoch=ev.epoch,
        message=ev.message,
    )
    if ev.loss is not None:
        msg.loss = ev.loss
    if ev.dp_epsilon_spent is not None:
        msg.dp_epsilon_spent = ev.dp_epsilon_spent
    return msg


def _model_info(shard: dict[str, Any]) -> client_pb2.ModelInfo:
    msg = client_pb2.ModelInfo(
        model_id=shard["model_id"],
        created_unix=shard["created_unix"],
        config=serde.config_to_proto(job_config(**shard["config"])),
        target_fingerprint=bytes.fromhex(shard["target_fingerprint"]),
        active_features=shard["active_features"],
        passive_features=shard["passive_features"],
        train_rows=shard["train_rows"],
        iterations=shard["metrics"]["iterations"],
    )
    loss = final_loss(shard)
    if loss is not None:
        msg.final_loss = loss
    spent = shard["metrics"].get("dp_epsilon_spent")
    if spent is not None:
        msg.dp_epsilon_spent = float(spent)
    return msg


class TrainingServicer(client_pb2_grpc.TrainingServiceServicer):
    def __init__(self, party: ActiveParty) -> None:
        self.party = party

    @rpc_method
    def StartTraining(
        self, request: client_pb2.StartTrainingRequest, context: grpc.ServicerContext
    ) -> client_pb2.JobStatus:
        config = serde.config_from_proto(request.config)
        job = self.party.start_training(request.job_id, config, list(request.train_ids), list(request.holdout_ids))
        return _status(job)

    @rpc_method
    def GetJobStatus(
        self, request: client_pb2.GetJobStatusRequest, context: grpc.ServicerContext
    ) -> client_pb2.JobStatus:
        return _status(self.party.job(request.job_id))

    @rpc_method
    def WatchJob(
        self, request: client_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[client_pb2.JobEvent]:
        job = self.party.job(request.job_id)
        for ev in job.watch():
            if not context.is_active():
                return
            yield _event(job.job_id, ev)

    @rpc_method
    def Predict(self, request: client_pb2.PredictRequest, context: grpc.ServicerContext) -> client_pb2.PredictReply:
        ids = list(request.ids)
        probs = self.party.predict(request.model_id, ids)
        return client_pb2.PredictReply(ids=ids, probabilities=probs.tolist())

    @rpc_method
    def ListModels(
        self, request: client_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> client_pb2.ListModelsReply:
        return client_pb2.ListModelsReply(models=[_model_info(s) for s in self.party.list_models()])
