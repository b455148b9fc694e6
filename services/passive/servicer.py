"""PartyService at B: decode, call one PassiveParty method, encode."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc

from common import serde
from common.errors import InvalidArgument
from common.metrics import CLOCK
from common.rpc import peer_identity, rpc_method
from services.passive.party import PassiveParty, Phase
from vfl.v1 import common_pb2, party_pb2, party_pb2_grpc


class PartyServicer(party_pb2_grpc.PartyServiceServicer):
    def __init__(self, party: PassiveParty, min_peer_bits: int) -> None:
        self.party = party
        self.min_peer_bits = min_peer_bits

    @rpc_method
    def ExchangeKeys(
        self, request: party_pb2.KeyExchangeRequest, context: grpc.ServicerContext
    ) -> party_pb2.KeyExchangeReply:
        active = serde.public_key_from_proto(request.active_key, "active_key", self.min_peer_bits)
        fp = self.party.exchange_keys(active)
        return party_pb2.KeyExchangeReply(
            passive_key=serde.public_key_to_proto(self.party.key.public), target_fingerprint=fp
        )

    @rpc_method
    def SetupJob(
        self, request_iterator: Iterator[party_pb2.SetupJobChunk], context: grpc.ServicerContext
    ) -> party_pb2.SetupJobReply:
        spec = None
        ids: list[str] = []
        holdout: list[str] = []
        for i, chunk in enumerate(request_iterator):
            if chunk.HasField("spec"):
                if i != 0:
                    raise InvalidArgument("spec: only allowed on the first chunk")
                spec = chunk.spec
            if chunk.ids and holdout:
                raise InvalidArgument("ids: every training id comes before the holdout ids")
            ids.extend(chunk.ids)
            holdout.extend(chunk.holdout_ids)
        if spec is None:
            raise InvalidArgument("spec: the first chunk must carry the job spec")
        if len(holdout) != spec.n_holdout:
            raise InvalidArgument(f"holdout_ids: spec.n_holdout says {spec.n_holdout}, got {len(holdout)} ids")
        config = serde.config_from_proto(spec.config)
        reply = self.party.setup_job(
            spec.job_id,
            config,
            spec.target_fingerprint,
            spec.active_features,
            spec.n_rows,
            ids,
            holdout,
            spec.active_clip_norm,
            caller(context),
        )
        return party_pb2.SetupJobReply(
            passive_features=reply.passive_features,
            passive_clip_norm=reply.clip_norm,
            passive_share_clip=reply.share_clip,
        )

    # Steps 1-5: each streaming RPC and its unary twin share one implementation.

    def _residual_shares(self, chunks: Iterable[common_pb2.StepChunk]) -> list[common_pb2.StepChunk]:
        with CLOCK.phase("handler_steps"):
            return self._residual_shares_timed(chunks)

    def _residual_shares_timed(self, chunks: Iterable[common_pb2.StepChunk]) -> list[common_pb2.StepChunk]:
        msg = serde.from_chunks(chunks, "ExchangeResidualShares")
        h = msg.require_header("ExchangeResidualShares")
        b_enc = self.party.residual_shares(h.job_id, h.iteration, h.target_fingerprint, msg)
        return list(serde.to_chunks(h, ciphers=b_enc))

    def _masked_gradients(self, chunks: Iterable[common_pb2.StepChunk]) -> list[common_pb2.StepChunk]:
        with CLOCK.phase("handler_steps"):
            return self._masked_gradients_timed(chunks)

    def _masked_gradients_timed(self, chunks: Iterable[common_pb2.StepChunk]) -> list[common_pb2.StepChunk]:
        msg = serde.from_chunks(chunks, "ExchangeMaskedGradients")
        h = msg.require_header("ExchangeMaskedGradients")
        z_a, grad_b = self.party.masked_gradients(h.job_id, h.iteration, h.target_fingerprint, msg)
        return list(serde.to_chunks(h, ciphers=grad_b, residues=(self.party.key.public, z_a)))

    def _apply_gradient(self, chunks: Iterable[common_pb2.StepChunk]) -> party_pb2.ApplyGradientReply:
        msg = serde.from_chunks(chunks, "ApplyGradient")
        h = msg.require_header("ApplyGradient")
        norm = self.party.apply_gradient(h.job_id, h.iteration, h.target_fingerprint, msg)
        return party_pb2.ApplyGradientReply(header=h, update_sq_norm=norm)

    @staticmethod
    def _one(parts: list[common_pb2.StepChunk], method: str) -> common_pb2.StepChunk:
        one = serde.single_chunk(parts)
        if one is None:
            raise InvalidArgument(f"{method}: the reply does not fit one message; use the streaming RPC")
        return one

    @rpc_method
    def ExchangeResidualShares(
        self, request_iterator: Iterator[common_pb2.StepChunk], context: grpc.ServicerContext
    ) -> Iterator[common_pb2.StepChunk]:
        yield from self._residual_shares(request_iterator)

    @rpc_method
    def ExchangeResidualSharesUnary(
        self, request: common_pb2.StepChunk, context: grpc.ServicerContext
    ) -> common_pb2.StepChunk:
        return self._one(self._residual_shares([request]), "ExchangeResidualSharesUnary")

    @rpc_method
    def ExchangeMaskedGradients(
        self, request_iterator: Iterator[common_pb2.StepChunk], context: grpc.ServicerContext
    ) -> Iterator[common_pb2.StepChunk]:
        yield from self._masked_gradients(request_iterator)

    @rpc_method
    def ExchangeMaskedGradientsUnary(
        self, request: common_pb2.StepChunk, context: grpc.ServicerContext
    ) -> common_pb2.StepChunk:
        return self._one(self._masked_gradients([request]), "ExchangeMaskedGradientsUnary")

    @rpc_method
    def ApplyGradient(
        self, request_iterator: Iterator[common_pb2.StepChunk], context: grpc.ServicerContext
    ) -> party_pb2.ApplyGradientReply:
        return self._apply_gradient(request_iterator)

    @rpc_method
    def ApplyGradientUnary(
        self, request: common_pb2.StepChunk, context: grpc.ServicerContext
    ) -> party_pb2.ApplyGradientReply:
        return self._apply_gradient([request])

    @rpc_method
    def ComputeLossShare(
        self, request: party_pb2.LossShareRequest, context: grpc.ServicerContext
    ) -> party_pb2.LossShareReply:
        h = request.header
        share = self.party.loss_share(h.job_id, h.iteration, h.target_fingerprint)
        return party_pb2.LossShareReply(header=h, share=serde.cipher_vector_to_proto(share))

    @rpc_method
    def GetJobState(self, request: party_pb2.JobStateRequest, context: grpc.ServicerContext) -> party_pb2.JobStateReply:
        h = request.header
        iteration, phase = self.party.job_state(h.job_id, h.target_fingerprint)
        return party_pb2.JobStateReply(header=h, iteration=iteration, phase=_PHASES[phase])

    @rpc_method
    def FinishJob(self, request: party_pb2.FinishJobRequest, context: grpc.ServicerContext) -> party_pb2.FinishJobReply:
        h = request.header
        return party_pb2.FinishJobReply(stored=self.party.finish_job(h.job_id, h.target_fingerprint, request.aborted))

    @rpc_method
    def PredictScores(
        self, request_iterator: Iterator[common_pb2.StepChunk], context: grpc.ServicerContext
    ) -> Iterator[common_pb2.StepChunk]:
        msg = serde.from_chunks(request_iterator, "PredictScores")
        h = msg.require_header("PredictScores")
        scores = self.party.predict(h.job_id, h.target_fingerprint, msg.ids, msg, caller(context))
        yield from serde.to_chunks(h, ciphers=scores)


def caller(context: grpc.ServicerContext) -> str:
    """The caller's certificate identity, the key of B's per-peer budgets
    ("insecure" for every caller of a plaintext test service)."""
    return peer_identity(context) or "insecure"


_PHASES = {
    Phase.SHARES: party_pb2.JOB_PHASE_SHARES,
    Phase.GRADIENTS: party_pb2.JOB_PHASE_GRADIENTS,
    Phase.APPLY: party_pb2.JOB_PHASE_APPLY,
}
