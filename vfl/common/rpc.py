"""gRPC plumbing shared by the services: server construction with health and
reflection, mutual TLS and per-call authorisation, channel options, the
domain-error-to-status mapping, structured logging and the (tests only)
transcript recorder."""

from __future__ import annotations

import base64
import functools
import inspect
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vfl.common.errors import (
    AlreadyExists,
    ConfigError,
    DamagedFile,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PeerError,
    ResourceExhausted,
    Unavailable,
    VflError,
)
from vfl.common.metrics import CLOCK
from vfl.common.prom import RPC_DURATION, RPC_ERRORS
from vfl.common.storage import atomic_write_text
from vfl.common.tls import SPIFFE_PREFIX, TlsConfig

log = logging.getLogger("vfl.rpc")

MAX_MESSAGE_BYTES = 16 << 20  # chunks are 1 MiB; this leaves room, never the limit
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # A restarted peer is found again within a second or two, not gRPC's default 20 s backoff cap.
    # Not grpc.min_reconnect_backoff_ms: gRPC takes it as the connect timeout too, and at 200 ms a
    # connection through the assistant with TLS fails every attempt once A-B's round trip passes
    # ~100 ms (tests/system/test_faults.py); gRPC's default (20 s) lets slow links connect.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
SERVER_OPTIONS = [
    # gRPC's default SO_REUSEPORT would let a second server share a port
    # another one listens on, each getting part of the calls.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def setup_logging(level: str, service: str) -> None:
    """One line per event, key=value, with the service name."""
    logging.basicConfig(
        level=level,
        format=f"ts=%(asctime)s level=%(levelname)s service={service} logger=%(name)s %(message)s",
        force=True,
    )


class _Malformed:
    """Stands in for a request that did not parse, so that the handler (not
    grpcio, which would answer INTERNAL) refuses it with INVALID_ARGUMENT."""


class MalformedRequestInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Every request that is not a valid message of its type is refused with
    INVALID_ARGUMENT naming the method, before any service code sees it."""

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler  # unknown method, or raw bytes
        parse = handler.request_deserializer
        message = f"request to {details.method}: not a valid protobuf message of the method's request type"

        def safe_parse(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception:  # noqa: BLE001 - any parse failure is the caller's malformed input
                return _Malformed()

        if handler.request_streaming:

            def checked(requests: Iterator[Any]) -> Iterator[Any]:
                for request in requests:
                    if isinstance(request, _Malformed):
                        raise InvalidArgument(message)
                    yield request

            kind = "stream_stream" if handler.response_streaming else "stream_unary"
            inner = getattr(handler, kind)

            def streaming(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return inner(checked(requests), context)

            return handler._replace(request_deserializer=safe_parse, **{kind: streaming})

        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        inner = getattr(handler, kind)

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            return inner(request, context)

        return handler._replace(request_deserializer=safe_parse, **{kind: unary})


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """vfl_rpc_duration_seconds{method, code} and vfl_rpc_errors_total{method,
    code} for every call this server serves (health and reflection too):
    the outermost interceptor, so that a call the authorisation or the
    request check refuses is counted with its code. The method label is the
    short name of a registered method (bounded: unknown methods are not
    counted); the code is the one the call ends with, read from the context
    (set by `context.abort` before it raises), UNKNOWN for an exception that
    is not an abort, CANCELLED for a response stream its caller dropped."""

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]

        def observe(context: grpc.ServicerContext, start: float, failed: grpc.StatusCode | None) -> None:
            code = context.code() or failed or grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            RPC_DURATION.labels(method, name).observe(time.perf_counter() - start)
            if name != "OK":
                RPC_ERRORS.labels(method, name).inc()

        if handler.response_streaming:
            kind = "stream_stream" if handler.request_streaming else "unary_stream"
            inner = getattr(handler, kind)

            def streamed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start, failed = time.perf_counter(), grpc.StatusCode.CANCELLED
                try:
                    yield from inner(request, context)
                    failed = grpc.StatusCode.OK
                except Exception:
                    failed = grpc.StatusCode.UNKNOWN
                    raise
                finally:  # GeneratorExit too: the caller went away mid-stream
                    observe(context, start, failed)

            return handler._replace(**{kind: streamed})

        kind = "stream_unary" if handler.request_streaming else "unary_unary"
        inner = getattr(handler, kind)

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                response = inner(request, context)
            except Exception:
                observe(context, start, grpc.StatusCode.UNKNOWN)
                raise
            observe(context, start, None)
            return response

        return handler._replace(**{kind: unary})


def create_server(
    add_servicers: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    host: str,
    port: int,
    max_workers: int = 16,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    tls: TlsConfig | None = None,
    allowed: Mapping[str, Collection[str]] | None = None,
) -> tuple[grpc.Server, int]:
    """A server with the given servicers, health and reflection, bound but not
    started. Returns the real port (useful with port 0).

    With `tls`, the port requires a client certificate signed by the CA and
    each call is authorised by the client's identity: `allowed` maps a
    service's full name to the identities that may call it (health and
    reflection: any authenticated client). Without it (VFL_INSECURE=true) the
    port is plaintext and a warning is logged."""
    interceptors = [MalformedRequestInterceptor(), *interceptors]
    if tls is not None:
        interceptors = [AuthzInterceptor(allowed or {}), *interceptors]
    interceptors = [MetricsInterceptor(), *interceptors]  # outermost: refusals are counted too
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=SERVER_OPTIONS, interceptors=list(interceptors)
    )
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*service_names, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        if tls is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials())
    except RuntimeError:  # grpcio raises instead of returning 0 in newer versions
        bound = 0
    if bound == 0:
        raise ConfigError(f"VFL_PORT: could not bind {host}:{port} (in use, or not an address of this machine)")
    if tls is None:
        log.warning(
            "event=insecure_transport VFL_INSECURE=true: PLAINTEXT gRPC, no TLS, no client authentication, "
            "no authorisation; anyone who can reach %s:%d can call every method. Local tests only.",
            host,
            bound,
        )
    else:
        log.info("event=tls identity=%s client_auth=required", tls.identity)
    return server, bound


# gRPC's proxy support reads https_proxy, http_proxy, grpc_proxy, no_proxy,
# no_grpc_proxy and GRPC_ADDRESS_HTTP_PROXY from the environment. None of them
# may route a channel of ours: every channel disables them, and the one that
# goes through the assistant names it explicitly (see `open_channel`).
NO_ENV_PROXY: list[tuple[str, Any]] = [
    ("grpc.enable_http_proxy", 0),
    # Not covered by enable_http_proxy: the address-level proxy (GRPC_ADDRESS_HTTP_PROXY).
    ("grpc.address_http_proxy_enabled_addresses", ""),
]
_NO_PROXY_VARS = ("no_grpc_proxy", "no_proxy")


def tunnel_options(proxy: str, token: str | None) -> list[tuple[str, Any]]:
    """Channel options that tunnel through the HTTP CONNECT proxy at `proxy`
    (host:port), with `Proxy-Authorization: Bearer <token>`.

    gRPC sends `CONNECT <target> HTTP/1.1` to the proxy and then runs TLS (or
    plaintext) and HTTP/2 to the target inside the tunnel. The channel
    argument overrides grpc_proxy/https_proxy/http_proxy, but gRPC still
    skips the proxy for a target listed in no_grpc_proxy, else no_proxy: so
    no_grpc_proxy is set to "" in this process (it takes precedence over
    no_proxy), and a value it had is logged. This process's other channels
    never use a proxy (NO_ENV_PROXY), so nothing else depends on it."""
    ignored = {name: os.environ[name] for name in _NO_PROXY_VARS if os.environ.get(name)}
    if ignored:
        log.warning("event=no_proxy_ignored vars=%s channel_via=%s", ",".join(sorted(ignored)), proxy)
    os.environ["no_grpc_proxy"] = ""
    options: list[tuple[str, Any]] = [
        ("grpc.http_proxy", f"http://{proxy}"),
        ("grpc.address_http_proxy_enabled_addresses", ""),
    ]
    if token is not None:
        options.append(("grpc.http_connect_headers", f"Proxy-Authorization:Bearer {token}"))
    return options


def open_channel(
    address: str,
    tls: TlsConfig | None = None,
    server_name: str | None = None,
    proxy: str | None = None,
    proxy_token: str | None = None,
) -> grpc.Channel:
    """A channel to `address`: plaintext, or mutual TLS with our certificate.
    `server_name` is the name the server's certificate must carry, when it is
    not the host of the address (e.g. "passive" for 127.0.0.1:port).

    With `proxy` (host:port of the assistant), the connection is an HTTP
    CONNECT tunnel through it, authenticated to it by `proxy_token`; TLS and
    the name check are still end to end with `address`. Without, no proxy at
    all, whatever the environment says."""
    options: list[tuple[str, Any]] = [*CHANNEL_OPTIONS]
    options += NO_ENV_PROXY if proxy is None else tunnel_options(proxy, proxy_token)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


# Any authenticated peer may check health and use reflection.
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The identity of a TLS client: its certificate's CN (else its
    spiffe://vfl/<name> SAN), or None without a verified certificate."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    for cn in auth.get("x509_common_name", []):
        return bytes(cn).decode(errors="replace")
    for uri in auth.get("peer_spiffe_id", []):
        text = bytes(uri).decode(errors="replace")
        if text.startswith(SPIFFE_PREFIX):
            return text.removeprefix(SPIFFE_PREFIX)
    return None


class AuthzInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Per-call authorisation by the TLS client's identity: a method of a
    service in `allowed` only from the identities listed for it, health and
    reflection from any authenticated client, anything else from nobody.
    A refused call ends with PERMISSION_DENIED naming the identity and the
    method, before the handler sees the request."""

    def __init__(self, allowed: Mapping[str, Collection[str]]) -> None:
        self._allowed = {service: frozenset(ids) for service, ids in allowed.items()}

    def _check(self, method: str, context: grpc.ServicerContext) -> None:
        identity = peer_identity(context)
        if identity is None:
            log.warning("event=rpc_denied method=%s identity=none", method)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: no verified client certificate")
        if method.startswith(OPEN_SERVICE_PREFIXES):
            return
        service = method.split("/")[1] if method.count("/") == 2 else ""
        if identity in self._allowed.get(service, ()):
            return
        log.warning("event=rpc_denied method=%s identity=%s", method, identity)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"identity {identity!r} may not call {method}")

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method, check = details.method, self._check

        def guarded(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                check(method, context)
                return fn(request, context)

            return call

        if handler.request_streaming and handler.response_streaming:
            make, fn = grpc.stream_stream_rpc_method_handler, handler.stream_stream
        elif handler.request_streaming:
            make, fn = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        elif handler.response_streaming:
            make, fn = grpc.unary_stream_rpc_method_handler, handler.unary_stream
        else:
            make, fn = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        return make(guarded(fn), handler.request_deserializer, handler.response_serializer)


F = TypeVar("F", bound=Callable[..., Any])

# The one table from domain errors to gRPC status codes (the domain knows
# nothing of gRPC). A subclass takes its nearest listed ancestor's code.
STATUS_OF: dict[type[VflError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DamagedFile: grpc.StatusCode.DATA_LOSS,
}


def status_of(exc: VflError) -> grpc.StatusCode:
    """The status a domain error is answered with; a peer's refusal keeps
    the peer's code."""
    if isinstance(exc, PeerError):
        return grpc.StatusCode[exc.status] if exc.status in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, VflError):
        code = status_of(exc)
        log.info("event=rpc_refused method=%s code=%s detail=%r", method, code.name, str(exc))
        context.abort(code, str(exc))
    if isinstance(exc, grpc.RpcError) and not context.is_active():
        # Reading the request stream failed because the caller cancelled or its
        # connection was lost: a network event, not a bug, and no one to answer.
        log.info("event=rpc_cancelled method=%s", method)
        context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled or its connection lost")
    # Unexpected: log the traceback for the operator, return only an id.
    ref = uuid.uuid4().hex[:12]
    log.exception("event=rpc_internal_error method=%s ref=%s", method, ref)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref} in the service log)")


def rpc_method(fn: F) -> F:
    """Servicer decorator: domain errors become their status code; anything
    else becomes INTERNAL with a log reference and no detail."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                with CLOCK.phase("handler"):
                    yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status below
                _abort(context, exc, fn.__name__)

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            with CLOCK.phase("handler"):
                return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            _abort(context, exc, fn.__name__)

    return wrapper  # type: ignore[return-value]


class TranscriptRecorder:
    """Appends every message a service receives to a JSON-lines file, so that a
    test can check what each party and the assistant could read. Off unless
    VFL_TRANSCRIPT_PATH is set."""

    def __init__(self, path: Path, service: str) -> None:
        self._path = path
        self._service = service
        self._lock = threading.Lock()

    def record(self, method: str, direction: str, message: Any) -> None:
        payload = message if isinstance(message, bytes) else message.SerializeToString()
        line = json.dumps(
            {
                "service": self._service,
                "method": method,
                "direction": direction,
                "type": type(message).__name__,
                "payload": base64.b64encode(payload).decode(),
                "t": time.time(),
            }
        )
        with self._lock, self._path.open("a") as fh:
            fh.write(line + "\n")

    def record_tunnel(self, tunnel: int, direction: str, data: bytes) -> None:
        """What the assistant relays: raw bytes of one tunnel and direction
        ("a_to_b" or "b_to_a"), as read from the socket."""
        line = json.dumps(
            {
                "service": self._service,
                "tunnel": tunnel,
                "direction": direction,
                "length": len(data),
                "payload": base64.b64encode(data).decode(),
                "t": time.time(),
            }
        )
        with self._lock, self._path.open("a") as fh:
            fh.write(line + "\n")

    def wrap(self, method: str, direction: str, messages: Iterable[Any]) -> Iterator[Any]:
        for m in messages:
            self.record(method, direction, m)
            yield m


class RecordingInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Records the requests a server receives (see TranscriptRecorder)."""

    def __init__(self, recorder: TranscriptRecorder) -> None:
        self._rec = recorder

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        method, rec = details.method, self._rec

        def one(req: Any) -> Any:
            rec.record(method, "request", req)
            return req

        if handler.request_streaming and handler.response_streaming:
            fn = handler.stream_stream
            return grpc.stream_stream_rpc_method_handler(
                lambda it, ctx: fn(rec.wrap(method, "request", it), ctx),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.request_streaming:
            fn = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                lambda it, ctx: fn(rec.wrap(method, "request", it), ctx),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.response_streaming:
            fn = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                lambda r, ctx: fn(one(r), ctx), handler.request_deserializer, handler.response_serializer
            )
        fn = handler.unary_unary
        return grpc.unary_unary_rpc_method_handler(
            lambda r, ctx: fn(one(r), ctx), handler.request_deserializer, handler.response_serializer
        )


def serve_forever(server: grpc.Server, port: int, port_file: Path | None, service: str, grace_s: float = 5.0) -> None:
    """Start, announce the port, and on SIGTERM/SIGINT drain in-flight calls."""
    server.start()
    if port_file is not None:
        atomic_write_text(port_file, str(port), mode=0o644)
    log.info("event=serving service=%s port=%d", service, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("event=stopping service=%s grace_s=%.1f", service, grace_s)
    server.stop(grace_s).wait()
