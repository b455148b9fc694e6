"""TrainingService at A: decode, call one ActiveParty method, encode."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from vfl.common import serde
from vfl.common.data import Scaler
from vfl.common.jobconfig import job_config
from vfl.common.rpc import rpc_method
from vfl.services.active.alignment import AlignmentRun
from vfl.services.active.jobs import Event, State, TrainingJob
from vfl.services.active.party import ActiveParty, final_loss
from vfl.v1 import client_pb2, client_pb2_grpc

_STATES = {
    State.RUNNING: client_pb2.JOB_STATE_RUNNING,
    State.SUCCEEDED: client_pb2.JOB_STATE_SUCCEEDED,
    State.FAILED: client_pb2.JOB_STATE_FAILED,
    State.CANCELLED: client_pb2.JOB_STATE_CANCELLED,
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
    if job.validation_losses:
        msg.validation_loss = job.validation_losses[-1][1]
    if job.best_iteration is not None:
        msg.best_iteration = job.best_iteration
    eta = job.eta_s()
    if eta is not None:
        msg.eta_s = eta
    if job.validation_auc is not None and job.validation_ks is not None:
        msg.validation_auc, msg.validation_ks = job.validation_auc, job.validation_ks
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
    if ev.eta_s is not None:
        msg.eta_s = ev.eta_s
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
        alignment_id=shard.get("alignment_id", ""),
        holdout_rows=shard.get("holdout_rows", 0),
    )
    loss = final_loss(shard)
    if loss is not None:
        msg.final_loss = loss
    spent = shard["metrics"].get("dp_epsilon_spent")
    if spent is not None:
        msg.dp_epsilon_spent = float(spent)
    validation = shard["metrics"].get("validation")
    if validation:
        msg.validation_auc, msg.validation_ks = validation["auc"], validation["ks"]
    return msg


def _model_detail(shard: dict[str, Any]) -> client_pb2.ModelDetail:
    m = shard["metrics"]
    raw_w, raw_b = Scaler.from_dict(shard["scaler"]).unscaled(np.asarray(shard["weights"]), shard["intercept"])
    msg = client_pb2.ModelDetail(
        info=_model_info(shard),
        loss_history=[client_pb2.LossPoint(iteration=i, loss=v) for i, v in m.get("loss_history", [])],
        validation_losses=[client_pb2.LossPoint(iteration=i, loss=v) for i, v in shard.get("validation_losses", [])],
        phase_seconds={k: float(v) for k, v in m.get("phases_s", {}).items()},
        bytes_sent=int(m.get("bytes_sent", 0)),
        elapsed_s=float(m.get("elapsed_s", 0.0)),
        holdout_ids=shard.get("holdout_ids", []),
        active_feature_names=shard.get("feature_names", []),
        active_weights=raw_w.tolist(),
        active_intercept=raw_b,
    )
    if shard.get("kept_iteration") is not None:
        msg.kept_iteration = shard["kept_iteration"]
    if shard.get("dp"):
        msg.dp_delta = float(shard["dp"]["delta"])
    return msg


_ALIGNMENT_STATES = {
    "running": client_pb2.ALIGNMENT_STATE_RUNNING,
    "succeeded": client_pb2.ALIGNMENT_STATE_SUCCEEDED,
    "failed": client_pb2.ALIGNMENT_STATE_FAILED,
}


def _alignment(run: AlignmentRun, include_ids: bool = False) -> client_pb2.Alignment:
    msg = client_pb2.Alignment(
        alignment_id=run.alignment_id,
        state=_ALIGNMENT_STATES[run.state],
        active_size=run.active_size,
        passive_size=run.passive_size,
        created_unix=run.started,
        error=run.error,
        elapsed_s=run.elapsed_s,
    )
    if run.record is not None:
        msg.size = run.record.size
        if include_ids:
            msg.ids.extend(run.record.ids)
    return msg


class TrainingServicer(client_pb2_grpc.TrainingServiceServicer):
    def __init__(self, party: ActiveParty) -> None:
        self.party = party

    @rpc_method
    def StartTraining(
        self, request: client_pb2.StartTrainingRequest, context: grpc.ServicerContext
    ) -> client_pb2.JobStatus:
        config = serde.config_from_proto(request.config)
        job = self.party.start_training(
            request.job_id, config, list(request.train_ids), list(request.holdout_ids), request.alignment_id
        )
        return _status(job)

    @rpc_method
    def StartAlignment(
        self, request: client_pb2.StartAlignmentRequest, context: grpc.ServicerContext
    ) -> client_pb2.Alignment:
        return _alignment(self.party.alignments.start(request.alignment_id, list(request.ids)))

    @rpc_method
    def GetAlignment(
        self, request: client_pb2.GetAlignmentRequest, context: grpc.ServicerContext
    ) -> client_pb2.Alignment:
        return _alignment(self.party.alignments.get(request.alignment_id), request.include_ids)

    @rpc_method
    def ListAlignments(
        self, request: client_pb2.ListAlignmentsRequest, context: grpc.ServicerContext
    ) -> client_pb2.ListAlignmentsReply:
        return client_pb2.ListAlignmentsReply(alignments=[_alignment(r) for r in self.party.alignments.list()])

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
        out = self.party.predict(request.model_id, ids, request.align_new_ids)
        status = [
            client_pb2.PREDICTION_STATUS_SCORED if s else client_pb2.PREDICTION_STATUS_NOT_AT_PASSIVE
            for s in out.scored
        ]
        return client_pb2.PredictReply(ids=ids, probabilities=out.probabilities.tolist(), status=status)

    @rpc_method
    def ListModels(
        self, request: client_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> client_pb2.ListModelsReply:
        return client_pb2.ListModelsReply(models=[_model_info(s) for s in self.party.list_models()])

    @rpc_method
    def CancelJob(self, request: client_pb2.CancelJobRequest, context: grpc.ServicerContext) -> client_pb2.JobStatus:
        return _status(self.party.cancel_job(request.job_id))

    @rpc_method
    def ListJobs(self, request: client_pb2.ListJobsRequest, context: grpc.ServicerContext) -> client_pb2.ListJobsReply:
        return client_pb2.ListJobsReply(jobs=[_status(j) for j in self.party.jobs()])

    @rpc_method
    def GetModel(self, request: client_pb2.GetModelRequest, context: grpc.ServicerContext) -> client_pb2.ModelDetail:
        return _model_detail(self.party.load_model(request.model_id))
