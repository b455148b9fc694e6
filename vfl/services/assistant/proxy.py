"""The assistant C as an HTTP CONNECT tunnel (PROTOCOL.md, "Assistant").

A opens its gRPC channel to B *through* C (gRPC's `grpc.http_proxy`): A
sends `CONNECT <B's address> HTTP/1.1` to C, C opens a TCP connection to
its one configured upstream (VFL_UPSTREAM_ADDRESS), answers 200, and from
then on copies bytes both ways. A and B run mutual TLS and HTTP/2 inside the
tunnel, end to end: C holds no key, terminates nothing and sees sizes and
timing only. It cannot read, originate, alter, replay or reorder a message
(the TLS records are authenticated) -- it can only delay, drop or cut them.

C relays for A only: a CONNECT must carry `Proxy-Authorization: Bearer
<VFL_RELAY_TOKEN>` (the per-federation relay token; gRPC sends it from the
`grpc.http_connect_headers` channel argument), and may name no target but
the upstream. Anything else is answered with an HTTP error and one log line
without payload:

    400  malformed request line or headers, or a header block over 8 KiB
    403  CONNECT to a target other than the upstream
    405  a method other than CONNECT (except GET /healthz)
    407  no or a wrong relay token
    502  the upstream refused or could not be reached
    503  too many open tunnels
    504  the upstream did not answer within VFL_CONNECT_TIMEOUT_S

`GET /healthz` answers 200 (the container health check; no token needed,
it reveals nothing). Each tunnel is closed after VFL_IDLE_TIMEOUT_S without
a byte in either direction (gRPC's keepalive pings keep a live channel
busier than that); a half-close (EOF from one side) is passed on and the
other direction keeps flowing until it ends too. Buffers are bounded: C
reads at most CHUNK bytes from one side and does not read more until they
have been written to the other side.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("vfl.assistant")

CHUNK = 64 << 10  # bytes read from one side before they are written to the other
MAX_HEAD = 8 << 10  # request line and headers
# What gRPC's http_connect handshaker waits for: a status line and a blank line.
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def normalise_target(target: str) -> str:
    """host:port with the host lower-cased and IPv6 brackets kept, for the
    comparison of a CONNECT target with the configured upstream."""
    host, sep, port = target.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{target!r}: expected host:port")
    return f"{host.lower()}:{int(port)}"


def split_target(target: str) -> tuple[str, int]:
    host, _, port = normalise_target(target).rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class TunnelStats:
    """Counters for the log and for tests: tunnels and bytes, nothing else."""

    opened: int = 0
    refused: int = 0
    active: int = 0
    a_to_b_bytes: int = 0
    b_to_a_bytes: int = 0


# (tunnel number, direction "a_to_b" or "b_to_a", bytes): the transcript hook (tests only).
Recorder = Callable[[int, str, bytes], None]


@dataclass
class TunnelProxy:
    upstream: str
    token: str | None
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    max_tunnels: int = 32
    recorder: Recorder | None = None
    stats: TunnelStats = field(default_factory=TunnelStats)

    def __post_init__(self) -> None:
        self._target = normalise_target(self.upstream)
        self._host, self._port = split_target(self.upstream)
        self._ids = itertools.count(1)

    def route(self, target: str) -> tuple[str, int] | None:
        """Where a CONNECT to `target` goes: to the upstream if that is what it
        names (host:port as configured), else nowhere. ValueError if malformed."""
        return (self._host, self._port) if normalise_target(target) == self._target else None

    # -- the request ------------------------------------------------------------

    async def _reply(self, writer: asyncio.StreamWriter, status: int, body: str = "") -> None:
        data = body.encode()
        head = f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n"
        if status == 407:
            head += 'Proxy-Authenticate: Bearer realm="vfl-relay"\r\n'
        writer.write(head.encode() + b"\r\n" + data)
        try:
            await asyncio.wait_for(writer.drain(), 5)
        except (TimeoutError, OSError):
            pass

    async def _refuse(self, writer: asyncio.StreamWriter, peer: str, status: int, why: str) -> None:
        self.stats.refused += 1
        log.warning("event=tunnel_refused peer=%s status=%d reason=%s", peer, status, why)
        await self._reply(writer, status, why + "\n")

    def _authorised(self, headers: dict[str, str]) -> bool:
        if self.token is None:
            return True
        scheme, _, value = headers.get("proxy-authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        try:
            await self._handle(reader, writer, peer)
        except OSError as exc:
            # The connection broke (reset, broken pipe) before or while it was
            # set up: a network event, not a bug.
            log.info("event=connection_lost peer=%s error=%s", peer, exc.strerror or exc)
        except Exception:  # noqa: BLE001 - one bad connection never stops the proxy
            log.exception("event=tunnel_error peer=%s", peer)
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.connect_timeout_s)
        except asyncio.LimitOverrunError:
            return await self._refuse(writer, peer, 400, "request headers too long")
        except asyncio.IncompleteReadError:
            return  # closed before a whole request (e.g. a port probe): nothing to answer
        except TimeoutError:
            return await self._refuse(writer, peer, 408, "no complete request in time")
        if len(head) > MAX_HEAD:
            return await self._refuse(writer, peer, 400, "request headers too long")
        try:
            lines = head.decode("ascii").split("\r\n")
            method, target, version = lines[0].split(" ")
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
            headers = {}
            for line in lines[1:]:
                if line:
                    name, sep, value = line.partition(":")
                    if not sep or not name or name != name.strip():
                        raise ValueError(line)
                    headers[name.lower()] = value.strip()
        except (UnicodeDecodeError, ValueError):
            return await self._refuse(writer, peer, 400, "malformed request")
        if method == "GET" and target == "/healthz":
            await self._reply(writer, 200, "ok\n")
            return None
        if method != "CONNECT":
            return await self._refuse(writer, peer, 405, f"method {method[:16]!r} not allowed: CONNECT only")
        if not self._authorised(headers):
            return await self._refuse(writer, peer, 407, "no valid relay token (VFL_RELAY_TOKEN)")
        try:
            route = self.route(target)
        except ValueError:
            return await self._refuse(writer, peer, 400, "malformed CONNECT target")
        if route is None:
            return await self._refuse(writer, peer, 403, f"CONNECT {target[:80]!r}: not the upstream")
        if self.stats.active >= self.max_tunnels:
            return await self._refuse(writer, peer, 503, f"{self.max_tunnels} tunnels open")
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*route, limit=CHUNK), self.connect_timeout_s
            )
        except TimeoutError:
            return await self._refuse(writer, peer, 504, f"upstream {self.upstream} did not answer")
        except OSError as exc:
            return await self._refuse(writer, peer, 502, f"upstream {self.upstream}: {exc.strerror or exc}")
        writer.write(ESTABLISHED)
        await writer.drain()
        await self._tunnel(peer, reader, writer, up_reader, up_writer)
        return None

    # -- the tunnel -------------------------------------------------------------

    async def _tunnel(
        self,
        peer: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        number = next(self._ids)
        self.stats.opened += 1
        self.stats.active += 1
        started = last = time.monotonic()
        counts = {"a_to_b": 0, "b_to_a": 0}
        log.info("event=tunnel_open tunnel=%d peer=%s upstream=%s", number, peer, self.upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
            nonlocal last
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                last = time.monotonic()
                counts[direction] += len(data)
                if self.recorder is not None:
                    self.recorder(number, direction, data)
                dst.write(data)
                await dst.drain()  # bounded: no further read until this is written
            if dst.can_write_eof():
                dst.write_eof()  # pass the half-close on; the other direction goes on

        tasks = [
            asyncio.ensure_future(pipe(reader, up_writer, "a_to_b")),
            asyncio.ensure_future(pipe(up_reader, writer, "b_to_a")),
        ]
        why = "closed"
        try:
            pending = set(tasks)
            while pending:
                # FIRST_EXCEPTION: a reset on either side ends the tunnel now, not at the
                # next tick (A's calls would wait for that); a half-close does not.
                done, pending = await asyncio.wait(
                    pending, timeout=min(5.0, self.idle_timeout_s), return_when=asyncio.FIRST_EXCEPTION
                )
                if any(t.exception() is not None for t in done if not t.cancelled()):
                    why = "reset"
                    break
                if pending and time.monotonic() - last > self.idle_timeout_s:
                    why = "idle"
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            up_writer.close()
            self.stats.active -= 1
            self.stats.a_to_b_bytes += counts["a_to_b"]
            self.stats.b_to_a_bytes += counts["b_to_a"]
            log.info(
                "event=tunnel_closed tunnel=%d reason=%s a_to_b_bytes=%d b_to_a_bytes=%d seconds=%.1f",
                number,
                why,
                counts["a_to_b"],
                counts["b_to_a"],
                time.monotonic() - started,
            )


async def serve(proxy: TunnelProxy, host: str, port: int, on_bound: Callable[[int], None], stop: asyncio.Event) -> None:
    """Serve until `stop` is set; `on_bound(port)` once listening."""
    server = await asyncio.start_server(proxy.handle, host, port, limit=CHUNK)
    bound = server.sockets[0].getsockname()[1]
    on_bound(bound)
    async with server:
        await stop.wait()
    s = proxy.stats
    log.info(
        "event=stopped tunnels=%d refused=%d a_to_b_bytes=%d b_to_a_bytes=%d",
        s.opened,
        s.refused,
        s.a_to_b_bytes,
        s.b_to_a_bytes,
    )
