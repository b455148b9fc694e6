"""A byte-level relay of PartyService (PROTOCOL.md, "Assistant").

C never parses a message: requests and replies pass through as bytes, so C
holds no key and could not decrypt if it tried. Status codes and details of
the passive party reach A unchanged; an unreachable passive party is
UNAVAILABLE with C's address in the message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from common.rpc import TranscriptRecorder, open_channel
from vfl.v1 import party_pb2

log = logging.getLogger("vfl.assistant")

PARTY_SERVICE = party_pb2.DESCRIPTOR.services_by_name["PartyService"]


class RelayHandler(grpc.GenericRpcHandler):
    def __init__(self, upstream: str, timeout_s: float, recorder: TranscriptRecorder | None = None) -> None:
        self.upstream = upstream
        self.timeout_s = timeout_s
        self._channel = open_channel(upstream)
        self._rec = recorder
        self._methods = {f"/{PARTY_SERVICE.full_name}/{m.name}": m for m in PARTY_SERVICE.methods}
        self.forwarded: dict[str, int] = {}  # routing metrics only
        self._lock = threading.Lock()

    def _count(self, method: str) -> None:
        with self._lock:
            self.forwarded[method] = self.forwarded.get(method, 0) + 1

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

    def _recorded(self, method: str, direction: str, items: Iterator[bytes]) -> Iterator[bytes]:
        return self._rec.wrap(method, direction, items) if self._rec else items

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        desc = self._methods.get(method)
        if desc is None:
            return None
        cs, ss = desc.client_streaming, desc.server_streaming
        upstream = {
            (False, False): self._channel.unary_unary,
            (True, False): self._channel.stream_unary,
            (False, True): self._channel.unary_stream,
            (True, True): self._channel.stream_stream,
        }[(cs, ss)](method)
        rec = self._recorded

        def forward(request: Any, context: grpc.ServicerContext) -> Any:
            self._count(method)
            req = rec(method, "request", request) if cs else next(iter(rec(method, "request", iter([request]))))
            if ss:
                return self._relay(
                    method, context, lambda: list(rec(method, "reply", upstream(req, timeout=self._deadline(context))))
                )
            reply = self._relay(method, context, lambda: upstream(req, timeout=self._deadline(context)))
            return next(iter(rec(method, "reply", iter([reply]))))

        if ss:

            def forward_stream(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
                yield from forward(request, context)

            handler = forward_stream
        else:
            handler = forward
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(cs, ss)]
        # No (de)serialisers: C handles opaque bytes.
        return make(handler)
