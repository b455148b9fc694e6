"""A's client of the passive party's PartyService, directly or tunnelled
through the assistant (an HTTP CONNECT proxy: TLS stays end to end with B).
Encodes requests, decodes replies, and maps gRPC failures to domain errors
that say which hop failed."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import grpc

from vfl.common import psi, serde
from vfl.common.crypto.backend import CipherVector, PublicKey
from vfl.common.crypto.pool import GATE
from vfl.common.errors import InvalidArgument, PeerError, Unavailable
from vfl.common.jobconfig import JobConfig
from vfl.common.metrics import CLOCK
from vfl.common.protocol.phases import Phase
from vfl.common.protocol.sessions import ACTIVE, GradientReply, PartyInfo
from vfl.common.rpc import TranscriptRecorder, open_channel
from vfl.common.tls import TlsConfig
from vfl.v1 import common_pb2, party_pb2, party_pb2_grpc

T = TypeVar("T")
# A connection that broke under a call (e.g. a TLS record that failed its
# integrity check: "Stream removed (Unwrap failed (TSI_DATA_CORRUPTED))") ends
# the call with UNKNOWN or INTERNAL from gRPC, not from B: the peer is lost,
# as with UNAVAILABLE, and the job resumes on a new connection.
_TRANSPORT_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
_TRANSPORT = re.compile(r"Stream removed|TSI_DATA_CORRUPTED|Socket closed|Connection reset|Broken pipe")
# gRPC's http_connect handshaker: "HTTP proxy returned response code 407".
_PROXY_CODE = re.compile(r"HTTP proxy returned response code (\d{3})")
_PROXY_REFUSALS = {
    400: "refused the tunnel request as malformed",
    403: "refused the tunnel: VFL_PEER_ADDRESS is not its VFL_UPSTREAM_ADDRESS",
    407: "refused the tunnel: wrong or missing relay token (VFL_RELAY_TOKEN)",
    502: "could not reach the passive party",
    503: "refused the tunnel: too many tunnels open",
    504: "could not reach the passive party in time",
}
_PHASES = {
    party_pb2.JOB_PHASE_SHARES: Phase.SHARES,
    party_pb2.JOB_PHASE_GRADIENTS: Phase.GRADIENTS,
    party_pb2.JOB_PHASE_APPLY: Phase.APPLY,
}
_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# A floor on the exponentiations per second one party's cores do while the
# other party's share them (measured: 19k/s per core alone): PSI deadlines.
PSI_POINTS_PER_S = 2000


class PassiveClient:
    def __init__(
        self,
        address: str,
        timeout_s: float,
        recorder: TranscriptRecorder | None = None,
        tls: TlsConfig | None = None,
        server_name: str | None = None,
        assistant: str | None = None,
        relay_token: str | None = None,
    ) -> None:
        self.address = address
        self.assistant = assistant
        self.timeout_s = timeout_s
        self._channel = open_channel(address, tls, server_name, proxy=assistant, proxy_token=relay_token)
        self._stub = party_pb2_grpc.PartyServiceStub(self._channel)
        self._rec = recorder
        self.passive_features = 0  # known after exchange_keys

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, fn: Callable[[], T]) -> T:
        # The loss share and B's step 5 overlap A's own work: their waits are
        # booked apart from the step calls A's training loop blocks on.
        phase = "rpc_background" if method.startswith(("ApplyGradient", "ComputeLossShare")) else "rpc_wait"
        try:
            with CLOCK.phase(phase), GATE.idle():
                return fn()
        except grpc.RpcError as exc:
            code = exc.code()
            if code in _DOWN or (code in _TRANSPORT_CODES and _TRANSPORT.search(exc.details() or "")):
                details = exc.details() or ""
                raise Unavailable(f"{self.failed_hop(details)}: {method} failed ({code.name}): {details}") from None
            raise PeerError(code.name, f"passive party refused {method}: {exc.details()}") from None

    def failed_hop(self, details: str) -> str:
        """Which hop failed, from gRPC's details: the assistant (down, or it
        refused the tunnel or could not reach B) or the passive party."""
        if self.assistant is None:
            return f"passive party at {self.address}"
        proxy_code = _PROXY_CODE.search(details)
        if proxy_code is not None:
            status = int(proxy_code.group(1))
            why = _PROXY_REFUSALS.get(status, "refused the tunnel")
            if status in (502, 504):
                why += f" at {self.address}"
            return f"assistant at {self.assistant} {why} (HTTP {status})"
        if self.assistant in details or "HTTP proxy" in details or "CONNECT" in details:
            return f"assistant at {self.assistant}"
        return f"passive party at {self.address} (through the assistant at {self.assistant})"

    def _received(self, method: str, replies: Any) -> Any:
        """Record what A receives (tests only), passing replies through."""
        if self._rec is None:
            return replies
        if isinstance(replies, Iterator) or hasattr(replies, "__next__"):
            return list(self._rec.wrap(method, "reply", replies))
        self._rec.record(method, "reply", replies)
        return replies

    def _stream(self, method: str, rpc: Any, chunks: Iterator[common_pb2.StepChunk]) -> serde.StepMessage:
        return self._call(
            method,
            lambda: serde.from_chunks(self._received(method, rpc(chunks, timeout=self.timeout_s)), method),
        )

    def exchange_keys(self, key: PublicKey, min_bits: int) -> tuple[PublicKey, bytes]:
        req = party_pb2.KeyExchangeRequest(active_key=serde.public_key_to_proto(key))
        reply = self._call(
            "ExchangeKeys", lambda: self._received("ExchangeKeys", self._stub.ExchangeKeys(req, timeout=self.timeout_s))
        )
        # B's feature count, as it stated it (what A tells the other passive parties of a job).
        self.passive_features = int(reply.passive_features)
        return serde.public_key_from_proto(reply.passive_key, "passive_key", min_bits), reply.target_fingerprint

    # --- alignment (PROTOCOL.md "Alignment"): points of 32 bytes, never ids ---

    def start_alignment(
        self, alignment_id: str, active_size: int, purpose: party_pb2.AlignmentPurpose.ValueType, model_id: str = ""
    ) -> int:
        """Step 1: returns |B's set|."""
        req = party_pb2.AlignmentOpen(
            alignment_id=alignment_id, active_size=active_size, purpose=purpose, model_id=model_id
        )
        reply = self._call(
            "StartAlignment",
            lambda: self._received("StartAlignment", self._stub.StartAlignment(req, timeout=self.timeout_s)),
        )
        return int(reply.passive_size)

    def _psi_timeout(self, points: int) -> float:
        # B exponentiates every point within the call: its deadline grows with the set.
        return self.timeout_s + points / PSI_POINTS_PER_S

    def blind_active_set(self, alignment_id: str, points: Iterable[bytes], count: int) -> bytes:
        """Step 2: A's `count` blinded points out (chunks, computed as they
        are sent), the same raised to b back, in order."""
        timeout = self._psi_timeout(2 * count)
        replies = self._call(
            "BlindActiveSet",
            lambda: self._received(
                "BlindActiveSet", self._stub.BlindActiveSet(_psi_chunks(alignment_id, points), timeout=timeout)
            ),
        )

        def collect() -> bytes:
            out = bytearray()
            for reply in replies:
                out += reply.points
            return bytes(out)

        return self._call("BlindActiveSet", collect)

    def fetch_passive_set(self, alignment_id: str, passive_size: int) -> Iterator[bytes]:
        """Step 3: B's blinded points, chunk by chunk (A blinds each as it comes)."""
        req = party_pb2.PsiFetch(alignment_id=alignment_id)
        # B may still be blinding its own set, and A blinds each chunk before taking the next.
        timeout = self._psi_timeout(2 * passive_size)
        replies = self._call(
            "FetchPassiveSet",
            lambda: self._received("FetchPassiveSet", self._stub.FetchPassiveSet(req, timeout=timeout)),
        )
        stream = iter(replies)
        while True:
            chunk = self._call("FetchPassiveSet", lambda: next(stream, None))
            if chunk is None:
                return
            yield chunk.points

    def finish_alignment(self, alignment_id: str, tags: bytes) -> tuple[int, bytes]:
        """Step 4: B's points after both scalars, back to B; (size, digest) as B found them."""
        reply = self._call(
            "FinishAlignment",
            lambda: self._received(
                "FinishAlignment",
                self._stub.FinishAlignment(
                    _psi_chunks(alignment_id, psi.chunks(tags)),
                    timeout=self._psi_timeout(len(tags) // psi.POINT_BYTES // 8),
                ),
            ),
        )
        return int(reply.size), bytes(reply.digest)

    def setup_job(
        self,
        job_id: str,
        config: JobConfig,
        target_fp: bytes,
        active_features: int,
        alignment_id: str,
        rows: Sequence[int],
        holdout_rows: Sequence[int] = (),
        active_clip_norm: float = 0.0,
        party_name: str = "",
        peers: Sequence[PartyInfo] = (),
    ) -> party_pb2.SetupJobReply:
        """`party_name`, `peers`: with several passive parties, B's name in
        the job and every other passive party (docs/PARTIES.md)."""
        spec = party_pb2.JobSpec(
            job_id=job_id,
            config=serde.config_to_proto(config),
            n_rows=len(rows),
            target_fingerprint=target_fp,
            active_features=active_features,
            n_holdout=len(holdout_rows),
            active_clip_norm=active_clip_norm,
            alignment_id=alignment_id,
            party_name=party_name,
            peers=[
                party_pb2.PassivePeer(name=p.name, key=serde.public_key_to_proto(p.key), features=p.features)
                for p in peers
            ],
        )
        step = serde.MAX_ROWS_PER_CHUNK

        def chunks() -> Iterator[party_pb2.SetupJobChunk]:
            yield party_pb2.SetupJobChunk(spec=spec)
            for s in range(0, len(rows), step):
                yield party_pb2.SetupJobChunk(rows=[int(r) for r in rows[s : s + step]])
            for s in range(0, len(holdout_rows), step):
                yield party_pb2.SetupJobChunk(holdout_rows=[int(r) for r in holdout_rows[s : s + step]])

        reply: party_pb2.SetupJobReply = self._call(
            "SetupJob", lambda: self._received("SetupJob", self._stub.SetupJob(chunks(), timeout=self.timeout_s))
        )
        return reply

    def _step(self, method: str, parts: list[common_pb2.StepChunk], reply_fits: bool) -> serde.StepMessage:
        """A step exchange: unary when both directions fit one message, else streamed."""
        one = serde.single_chunk(parts) if reply_fits else None
        if one is None:
            return self._stream(method, getattr(self._stub, method), iter(parts))
        unary = getattr(self._stub, method + "Unary")
        name = method + "Unary"
        return self._call(
            name, lambda: serde.from_chunks([self._received(name, unary(one, timeout=self.timeout_s))], name)
        )

    def exchange_score_powers(
        self, header: common_pb2.StepHeader, rows: Sequence[int], powers: CipherVector
    ) -> serde.StepMessage:
        """Step 0 (residual poly5): always streamed (four ciphertexts per row)."""
        parts = list(serde.to_chunks(header, rows=rows, ciphers=powers))
        return self._stream("ExchangeScorePowers", self._stub.ExchangeScorePowers, iter(parts))

    def exchange_residual_shares(
        self, header: common_pb2.StepHeader, rows: Sequence[int], a_enc: CipherVector, reply_width: int
    ) -> serde.StepMessage:
        parts = list(serde.to_chunks(header, rows=rows, ciphers=a_enc))
        return self._step("ExchangeResidualShares", parts, serde.fits_one_chunk(len(rows), reply_width))

    def exchange_masked_gradients(
        self,
        header: common_pb2.StepHeader,
        grad_a: CipherVector,
        reply_count: int,
        reply_width: int,
        party_ciphers: Mapping[str, CipherVector] | None = None,
    ) -> serde.StepMessage:
        parts = list(serde.to_chunks(header, ciphers=grad_a, party_ciphers=party_ciphers))
        # The reply holds B's masked gradient and z_A: at most two vectors of reply_count.
        return self._step("ExchangeMaskedGradients", parts, serde.fits_one_chunk(2 * reply_count, reply_width))

    def apply_gradient(
        self,
        header: common_pb2.StepHeader,
        key: PublicKey,
        z_b: Sequence[int],
        party_residues: Mapping[str, tuple[PublicKey, Sequence[int]]] | None = None,
    ) -> float:
        parts = list(serde.to_chunks(header, residues=(key, z_b), party_residues=party_residues))
        one = serde.single_chunk(parts)
        if one is None:
            reply = self._call(
                "ApplyGradient",
                lambda: self._received("ApplyGradient", self._stub.ApplyGradient(iter(parts), timeout=self.timeout_s)),
            )
        else:
            reply = self._call(
                "ApplyGradientUnary",
                lambda: self._received(
                    "ApplyGradientUnary", self._stub.ApplyGradientUnary(one, timeout=self.timeout_s)
                ),
            )
        return float(reply.update_sq_norm)

    def decrypt_peer_gradients(
        self, header: common_pb2.StepHeader, gradients: Mapping[str, CipherVector]
    ) -> serde.StepMessage:
        """Step 4 at a passive party for the other passive parties' masked gradients under its key."""
        one = serde.single_chunk(list(serde.to_chunks(header, party_ciphers=gradients)))
        if one is None:
            raise InvalidArgument("DecryptPeerGradients: the request does not fit one message; use smaller batches")
        return self._call(
            "DecryptPeerGradients",
            lambda: serde.from_chunks(
                [self._received("DecryptPeerGradients", self._stub.DecryptPeerGradients(one, timeout=self.timeout_s))],
                "DecryptPeerGradients",
            ),
        )

    def _unary_step(self, method: str, one: common_pb2.StepChunk) -> serde.StepMessage:
        rpc = getattr(self._stub, method)
        return self._call(
            method, lambda: serde.from_chunks([self._received(method, rpc(one, timeout=self.timeout_s))], method)
        )

    def loss_cross_terms(self, header: common_pb2.StepHeader) -> serde.StepMessage:
        return self._unary_step("ComputeLossCrossTerms", common_pb2.StepChunk(header=header))

    def decrypt_loss_terms(self, header: common_pb2.StepHeader, terms: Mapping[str, CipherVector]) -> None:
        one = serde.single_chunk(list(serde.to_chunks(header, party_ciphers=terms)))
        assert one is not None  # one ciphertext per party
        self._unary_step("DecryptLossTerms", one)

    def loss_share(self, header: common_pb2.StepHeader, key: PublicKey) -> CipherVector:
        req = party_pb2.LossShareRequest(header=header)
        reply = self._call(
            "ComputeLossShare",
            lambda: self._received("ComputeLossShare", self._stub.ComputeLossShare(req, timeout=self.timeout_s)),
        )
        return serde.cipher_vector_from_proto(reply.share, key, "loss share")

    def job_state(self, header: common_pb2.StepHeader) -> tuple[int, Phase]:
        """(iteration, the step B expects next) of the job at B."""
        req = party_pb2.JobStateRequest(header=header)
        reply = self._call(
            "GetJobState", lambda: self._received("GetJobState", self._stub.GetJobState(req, timeout=self.timeout_s))
        )
        phase = _PHASES.get(reply.phase)
        if phase is None:
            raise PeerError(
                "INVALID_ARGUMENT", f"passive party answered GetJobState with an unknown phase {reply.phase}"
            )
        return int(reply.iteration), phase

    def validation_share(
        self, header: common_pb2.StepHeader, best_iteration: int | None, a_val: CipherVector, key: PublicKey
    ) -> CipherVector:
        def call() -> party_pb2.LossShareReply:
            chunks = serde.to_chunks(header, ciphers=a_val, best_iteration=best_iteration)
            reply = self._stub.ComputeValidationShare(chunks, timeout=self.timeout_s)
            return cast(party_pb2.LossShareReply, self._received("ComputeValidationShare", reply))

        reply = self._call("ComputeValidationShare", call)
        return serde.cipher_vector_from_proto(reply.share, key, "validation share")

    def finish_job(self, header: common_pb2.StepHeader, aborted: bool, keep_iteration: int | None = None) -> bool:
        req = party_pb2.FinishJobRequest(header=header, aborted=aborted, keep_iteration=keep_iteration)
        reply = self._call(
            "FinishJob", lambda: self._received("FinishJob", self._stub.FinishJob(req, timeout=self.timeout_s))
        )
        return bool(reply.stored)

    def predict_scores(
        self, header: common_pb2.StepHeader, alignment_id: str, rows: Sequence[int], u_a_enc: CipherVector
    ) -> serde.StepMessage:
        chunks = serde.to_chunks(header, rows=rows, alignment_id=alignment_id, ciphers=u_a_enc)
        return self._stream("PredictScores", self._stub.PredictScores, chunks)


def _psi_chunks(alignment_id: str, parts: Iterable[bytes]) -> Iterator[party_pb2.PsiChunk]:
    first = True
    for part in parts:
        yield party_pb2.PsiChunk(alignment_id=alignment_id if first else "", points=part)
        first = False
    if first:
        yield party_pb2.PsiChunk(alignment_id=alignment_id)


class PartyServicePort:
    """The protocol session's port (`sessions.PassivePort`) on one passive
    party's PartyService, for one job: each method is one RPC of
    party.proto, its reply decoded into domain types. `peers`: the job's
    other passive parties (name -> public key); none for the two-party
    protocol, where step 4's remote part is no call at all."""

    def __init__(
        self,
        client: PassiveClient,
        job_id: str,
        target_fp: bytes,
        active_key: PublicKey,
        passive_key: PublicKey,
        p_passive: int,
        peers: Mapping[str, PublicKey] | None = None,
        name: str = "",
    ) -> None:
        """`name`: this passive party's name in the job (with `peers`)."""
        self.client, self.job_id, self.target_fp, self.name = client, job_id, target_fp, name
        self.active_key, self.passive_key, self.p_passive = active_key, passive_key, p_passive
        self.peers = dict(peers or {})
        if self.peers and not name:
            raise InvalidArgument("name: the passive party's name in the job is required with peers")

    def _header(self, t: int) -> common_pb2.StepHeader:
        return serde.step_header(self.job_id, t, self.target_fp)

    def exchange_score_powers(self, t: int, rows: Sequence[int], powers: CipherVector) -> CipherVector:
        reply = self.client.exchange_score_powers(self._header(t), rows, powers)
        return reply.ciphers(self.active_key, "[[cross + s]]_A")

    def exchange_residual_shares(self, t: int, rows: Sequence[int], a_enc: CipherVector) -> CipherVector:
        reply = self.client.exchange_residual_shares(self._header(t), rows, a_enc, self.passive_key.cipher_width)
        return reply.ciphers(self.passive_key, "[[b_S]]_B")

    def exchange_masked_gradients(
        self, t: int, active_gradient: CipherVector, peer_shares: Mapping[str, CipherVector]
    ) -> GradientReply:
        if sorted(peer_shares) != sorted(self.peers):
            raise InvalidArgument(f"peer_shares: expected shares of {sorted(self.peers)}, got {sorted(peer_shares)}")
        width = max(self.passive_key.residue_width, self.active_key.cipher_width)
        count = max(len(active_gradient), self.p_passive)
        reply = self.client.exchange_masked_gradients(
            self._header(t), active_gradient, count, width, party_ciphers=peer_shares
        )
        z_a = reply.residues(self.passive_key, "z_A")
        gradients = {ACTIVE: reply.ciphers(self.active_key, "[[h_B + R_B]]_A")}
        if self.peers:
            gradients.update(reply.party_cipher_vectors(self.peers, "party_ciphertexts"))
        return GradientReply(z_a, gradients)

    def decrypt_peer_gradients(self, t: int, gradients: Mapping[str, CipherVector]) -> Mapping[str, list[int]]:
        if sorted(gradients) != sorted(self.peers):
            raise InvalidArgument(f"gradients: expected those of {sorted(self.peers)}, got {sorted(gradients)}")
        if not gradients:
            return {}
        reply = self.client.decrypt_peer_gradients(self._header(t), gradients)
        return reply.party_residue_lists({n: self.passive_key for n in self.peers}, "party_residues")

    def apply_gradient(self, t: int, decryptions: Mapping[str, list[int]]) -> None:
        if sorted(decryptions) != sorted([ACTIVE, *self.peers]):
            raise InvalidArgument(f"decryptions: expected A's and {sorted(self.peers)}, got {sorted(decryptions)}")
        others = {n: (self.peers[n], z) for n, z in decryptions.items() if n != ACTIVE}
        self.client.apply_gradient(self._header(t), self.active_key, decryptions[ACTIVE], party_residues=others)

    def loss_cross_terms(self, t: int) -> Mapping[str, CipherVector]:
        later = {n: k for n, k in self.peers.items() if n > self.name}
        if not later:
            return {}
        reply = self.client.loss_cross_terms(self._header(t))
        return reply.party_cipher_vectors(later, "party_ciphertexts")

    def decrypt_loss_terms(self, t: int, terms: Mapping[str, CipherVector]) -> None:
        earlier = sorted(n for n in self.peers if n < self.name)
        if sorted(terms) != earlier:
            raise InvalidArgument(f"terms: expected those of {earlier}, got {sorted(terms)}")
        if terms:
            self.client.decrypt_loss_terms(self._header(t), terms)

    def loss_share(self, t: int) -> CipherVector:
        return self.client.loss_share(self._header(t), self.active_key)


class PredictionServicePort:
    """The session's prediction port (`sessions.PredictionPort`) on one
    passive party's PredictScores, for one model and one set of rows:
    positions in an alignment that party holds, never ids."""

    def __init__(
        self, client: PassiveClient, model_id: str, target_fp: bytes, alignment_id: str, rows: Sequence[int]
    ) -> None:
        self.client, self.model_id, self.target_fp = client, model_id, target_fp
        self.alignment_id, self.rows = alignment_id, list(rows)

    def predict_scores(self, u_active_enc: CipherVector) -> CipherVector:
        header = serde.step_header(self.model_id, 0, self.target_fp)
        reply = self.client.predict_scores(header, self.alignment_id, self.rows, u_active_enc)
        return reply.ciphers(u_active_enc.key, "[[u_A + u_B]]_A")
