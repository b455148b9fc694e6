"""PartyService at B: decode, call one PassiveParty method, encode."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc

from vfl.common import serde
from vfl.common.errors import InvalidArgument
from vfl.common.metrics import CLOCK
from vfl.common.protocol.phases import Phase
from vfl.common.protocol.sessions import ACTIVE, PartyInfo
from vfl.common.rpc import peer_identity, rpc_method
from vfl.services.passive.party import PassiveParty
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
            passive_key=serde.public_key_to_proto(self.party.key.public),
            target_fingerprint=fp,
            passive_features=self.party.data.n_features,
        )

    # Alignment (steps 1-4 of PROTOCOL.md "Alignment"): 32-byte points only.

    @rpc_method
    def StartAlignment(
        self, request: party_pb2.AlignmentOpen, context: grpc.ServicerContext
    ) -> party_pb2.AlignmentOpened:
        purpose = _PURPOSES.get(request.purpose)
        if purpose is None:
            raise InvalidArgument("purpose: expected ALIGNMENT_PURPOSE_TRAINING or ALIGNMENT_PURPOSE_PREDICTION")
        size = self.party.alignments.open(
            request.alignment_id, request.active_size, purpose, request.model_id, caller(context)
        )
        return party_pb2.AlignmentOpened(passive_size=size)

    @rpc_method
    def BlindActiveSet(
        self, request_iterator: Iterator[party_pb2.PsiChunk], context: grpc.ServicerContext
    ) -> Iterator[party_pb2.PsiChunk]:
        alignment_id, points = _psi_stream(request_iterator, "BlindActiveSet")
        for tags in self.party.alignments.blind_active_set(alignment_id, caller(context), points):
            yield party_pb2.PsiChunk(points=tags)

    @rpc_method
    def FetchPassiveSet(
        self, request: party_pb2.PsiFetch, context: grpc.ServicerContext
    ) -> Iterator[party_pb2.PsiChunk]:
        for points in self.party.alignments.fetch_passive_set(request.alignment_id, caller(context)):
            yield party_pb2.PsiChunk(points=points)

    @rpc_method
    def FinishAlignment(
        self, request_iterator: Iterator[party_pb2.PsiChunk], context: grpc.ServicerContext
    ) -> party_pb2.AlignmentFinished:
        alignment_id, points = _psi_stream(request_iterator, "FinishAlignment")
        record = self.party.alignments.finish(alignment_id, caller(context), points)
        return party_pb2.AlignmentFinished(size=record.size, digest=record.digest)

    @rpc_method
    def SetupJob(
        self, request_iterator: Iterator[party_pb2.SetupJobChunk], context: grpc.ServicerContext
    ) -> party_pb2.SetupJobReply:
        spec = None
        rows: list[int] = []
        holdout: list[int] = []
        for i, chunk in enumerate(request_iterator):
            if chunk.HasField("spec"):
                if i != 0:
                    raise InvalidArgument("spec: only allowed on the first chunk")
                spec = chunk.spec
            if chunk.rows and holdout:
                raise InvalidArgument("rows: every training row comes before the holdout rows")
            rows.extend(chunk.rows)
            holdout.extend(chunk.holdout_rows)
        if spec is None:
            raise InvalidArgument("spec: the first chunk must carry the job spec")
        if len(holdout) != spec.n_holdout:
            raise InvalidArgument(f"holdout_rows: spec.n_holdout says {spec.n_holdout}, got {len(holdout)} rows")
        config = serde.config_from_proto(spec.config)
        peers = [
            PartyInfo(
                peer.name,
                serde.public_key_from_proto(peer.key, f"spec.peers[{peer.name[:64]}].key", self.min_peer_bits),
                peer.features,
            )
            for peer in spec.peers
        ]
        if peers and not spec.party_name:
            raise InvalidArgument("spec.party_name: required with spec.peers")
        reply = self.party.setup_job(
            spec.job_id,
            config,
            spec.target_fingerprint,
            spec.active_features,
            spec.n_rows,
            spec.alignment_id,
            rows,
            holdout,
            spec.active_clip_norm,
            caller(context),
            spec.party_name,
            peers,
        )
        return party_pb2.SetupJobReply(
            passive_features=reply.passive_features,
            passive_clip_norm=reply.clip_norm,
            passive_share_clip=reply.share_clip,
            scores_any_row=reply.scores_any_row,
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
        if self.party.several(h.job_id):
            reply = self.party.session_masked_gradients(h.job_id, h.iteration, h.target_fingerprint, msg)
            others = {n: c for n, c in reply.gradients.items() if n != ACTIVE}
            own = (self.party.key.public, reply.z_active)
            return list(serde.to_chunks(h, ciphers=reply.gradients[ACTIVE], residues=own, party_ciphers=others))
        z_a, grad_b = self.party.masked_gradients(h.job_id, h.iteration, h.target_fingerprint, msg)
        return list(serde.to_chunks(h, ciphers=grad_b, residues=(self.party.key.public, z_a)))

    def _apply_gradient(self, chunks: Iterable[common_pb2.StepChunk]) -> party_pb2.ApplyGradientReply:
        msg = serde.from_chunks(chunks, "ApplyGradient")
        h = msg.require_header("ApplyGradient")
        if self.party.several(h.job_id):
            self.party.session_apply(h.job_id, h.iteration, h.target_fingerprint, msg)
            return party_pb2.ApplyGradientReply(header=h, update_sq_norm=0.0)
        norm = self.party.apply_gradient(h.job_id, h.iteration, h.target_fingerprint, msg)
        return party_pb2.ApplyGradientReply(header=h, update_sq_norm=norm)

    @staticmethod
    def _one(parts: list[common_pb2.StepChunk], method: str) -> common_pb2.StepChunk:
        one = serde.single_chunk(parts)
        if one is None:
            raise InvalidArgument(f"{method}: the reply does not fit one message; use the streaming RPC")
        return one

    @rpc_method
    def ExchangeScorePowers(
        self, request_iterator: Iterator[common_pb2.StepChunk], context: grpc.ServicerContext
    ) -> Iterator[common_pb2.StepChunk]:
        with CLOCK.phase("handler_steps"):
            msg = serde.from_chunks(request_iterator, "ExchangeScorePowers")
            h = msg.require_header("ExchangeScorePowers")
            reply = self.party.session_score_powers(h.job_id, h.iteration, h.target_fingerprint, msg)
            parts = list(serde.to_chunks(h, ciphers=reply))
        yield from parts

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
    def DecryptPeerGradients(
        self, request: common_pb2.StepChunk, context: grpc.ServicerContext
    ) -> common_pb2.StepChunk:
        msg = serde.from_chunks([request], "DecryptPeerGradients")
        h = msg.require_header("DecryptPeerGradients")
        z = self.party.session_decrypt(h.job_id, h.iteration, h.target_fingerprint, msg)
        key = self.party.key.public
        return self._one(
            list(serde.to_chunks(h, party_residues={n: (key, v) for n, v in z.items()})), "DecryptPeerGradients"
        )

    @rpc_method
    def ComputeLossCrossTerms(
        self, request: common_pb2.StepChunk, context: grpc.ServicerContext
    ) -> common_pb2.StepChunk:
        msg = serde.from_chunks([request], "ComputeLossCrossTerms")
        h = msg.require_header("ComputeLossCrossTerms")
        terms = self.party.session_loss_terms(h.job_id, h.iteration, h.target_fingerprint)
        return self._one(list(serde.to_chunks(h, party_ciphers=terms)), "ComputeLossCrossTerms")

    @rpc_method
    def DecryptLossTerms(self, request: common_pb2.StepChunk, context: grpc.ServicerContext) -> common_pb2.StepChunk:
        msg = serde.from_chunks([request], "DecryptLossTerms")
        h = msg.require_header("DecryptLossTerms")
        self.party.session_decrypt_loss_terms(h.job_id, h.iteration, h.target_fingerprint, msg)
        return common_pb2.StepChunk(header=h)

    @rpc_method
    def ComputeLossShare(
        self, request: party_pb2.LossShareRequest, context: grpc.ServicerContext
    ) -> party_pb2.LossShareReply:
        h = request.header
        share = self.party.loss_share(h.job_id, h.iteration, h.target_fingerprint)
        return party_pb2.LossShareReply(header=h, share=serde.cipher_vector_to_proto(share))

    @rpc_method
    def ComputeValidationShare(
        self, request_iterator: Iterator[common_pb2.StepChunk], context: grpc.ServicerContext
    ) -> party_pb2.LossShareReply:
        msg = serde.from_chunks(request_iterator, "ComputeValidationShare")
        h = msg.require_header("ComputeValidationShare")
        share = self.party.validation_share(h.job_id, h.target_fingerprint, msg)
        return party_pb2.LossShareReply(header=h, share=serde.cipher_vector_to_proto(share))

    @rpc_method
    def GetJobState(self, request: party_pb2.JobStateRequest, context: grpc.ServicerContext) -> party_pb2.JobStateReply:
        h = request.header
        iteration, phase = self.party.job_state(h.job_id, h.target_fingerprint)
        return party_pb2.JobStateReply(header=h, iteration=iteration, phase=_PHASES[phase])

    @rpc_method
    def FinishJob(self, request: party_pb2.FinishJobRequest, context: grpc.ServicerContext) -> party_pb2.FinishJobReply:
        h = request.header
        keep = request.keep_iteration if request.HasField("keep_iteration") else None
        stored = self.party.finish_job(h.job_id, h.target_fingerprint, request.aborted, keep)
        return party_pb2.FinishJobReply(stored=stored)

    @rpc_method
    def PredictScores(
        self, request_iterator: Iterator[common_pb2.StepChunk], context: grpc.ServicerContext
    ) -> Iterator[common_pb2.StepChunk]:
        msg = serde.from_chunks(request_iterator, "PredictScores")
        h = msg.require_header("PredictScores")
        scores = self.party.predict(h.job_id, h.target_fingerprint, msg.alignment_id, msg.rows, msg, caller(context))
        yield from serde.to_chunks(h, ciphers=scores)


def caller(context: grpc.ServicerContext) -> str:
    """The caller's certificate identity, the key of B's per-peer budgets
    ("insecure" for every caller of a plaintext test service)."""
    return peer_identity(context) or "insecure"


def _psi_stream(chunks: Iterator[party_pb2.PsiChunk], method: str) -> tuple[str, Iterator[bytes]]:
    """The alignment id of the stream's first chunk, and its points chunk by
    chunk (consumed as they arrive: B works on one chunk at a time)."""
    first = next(chunks, None)
    if first is None or not first.alignment_id:
        raise InvalidArgument(f"{method}: the first chunk must carry alignment_id")

    def points() -> Iterator[bytes]:
        yield first.points
        for chunk in chunks:
            if chunk.alignment_id:
                raise InvalidArgument(f"{method}: alignment_id only allowed on the first chunk")
            yield chunk.points

    return first.alignment_id, points()


_PURPOSES = {
    party_pb2.ALIGNMENT_PURPOSE_TRAINING: "training",
    party_pb2.ALIGNMENT_PURPOSE_PREDICTION: "prediction",
}

_PHASES = {
    Phase.SHARES: party_pb2.JOB_PHASE_SHARES,
    Phase.GRADIENTS: party_pb2.JOB_PHASE_GRADIENTS,
    Phase.APPLY: party_pb2.JOB_PHASE_APPLY,
}
