"""A byte-level relay of PartyService (PROTOCOL.md, "Assistant").

C never parses a message: requests and replies pass through as bytes, so C
holds no key and could not decrypt if it tried. Status codes and details of
the passive party reach A unchanged; an unreachable passive party is
UNAVAILABLE with C's address in the message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from common.rpc import TranscriptRecorder, open_channel
from common.tls import TlsConfig
from vfl.v1 import party_pb2

log = logging.getLogger("vfl.assistant")

PARTY_SERVICE = party_pb2.DESCRIPTOR.services_by_name["PartyService"]


class RelayHandler(grpc.GenericRpcHandler):
    def __init__(
        self,
        upstream: str,
        timeout_s: float,
        recorder: TranscriptRecorder | None = None,
        tls: TlsConfig | None = None,
        server_name: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.timeout_s = timeout_s
        self._channel = open_channel(upstream, tls, server_name)
        self._rec = recorder
        self._methods = {f"/{PARTY_SERVICE.full_name}/{m.name}": m for m in PARTY_SERVICE.methods}

    def _deadline(self, context: grpc.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.timeout_s if remaining is None else min(self.timeout_s, remaining)

    def _relay(self, method: str, context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                details = f"assistant could not reach the passive party at {self.upstream}: {details}"
            log.info("event=relay_error method=%s code=%s", method, code.name)
            context.abort(code, details or "")

    def _record(self, method: str, direction: str, message: bytes) -> bytes:
        if self._rec is not None:
            self._rec.record(method, direction, message)
        return message

    def _record_all(self, method: str, direction: str, messages: Iterator[bytes]) -> Iterator[bytes]:
        return messages if self._rec is None else self._rec.wrap(method, direction, messages)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        desc = self._methods.get(method)
        if desc is None:
            return None
        client_streaming, server_streaming = desc.client_streaming, desc.server_streaming
        kind = (client_streaming, server_streaming)
        upstream = _UPSTREAM_CALL[kind](self._channel, method)

        def forward(request: Any, context: grpc.ServicerContext) -> Any:
            if client_streaming:
                request = self._record_all(method, "request", request)
            else:
                request = self._record(method, "request", request)

            def call() -> Any:
                reply = upstream(request, timeout=self._deadline(context))
                if server_streaming:
                    return list(self._record_all(method, "reply", reply))
                return self._record(method, "reply", reply)

            return self._relay(method, context, call)

        def forward_stream(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
            yield from forward(request, context)

        # No (de)serialisers: C handles opaque bytes.
        return _HANDLER[kind](forward_stream if server_streaming else forward)


_UPSTREAM_CALL: dict[tuple[bool, bool], Callable[[grpc.Channel, str], Any]] = {
    (False, False): lambda ch, m: ch.unary_unary(m),
    (True, False): lambda ch, m: ch.stream_unary(m),
    (False, True): lambda ch, m: ch.unary_stream(m),
    (True, True): lambda ch, m: ch.stream_stream(m),
}
_HANDLER: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
