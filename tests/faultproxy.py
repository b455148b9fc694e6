"""A fault-injecting TCP proxy for tests, for kernels without netem, and
FaultyFederation: a LocalFederation with one on each of its links.

    with FaultProxy(("127.0.0.1", port), Faults(latency_s=0.02, reset_p=0.01, seed=3)) as proxy:
        connect_to(proxy.address)          # "127.0.0.1:<port>", forwarded to the target
        proxy.set_faults(Faults())         # live: a clean link from the next chunk on
        print(proxy.stats)                 # what it did: connections, bytes, resets, stalls, ...

It runs an asyncio event loop in its own thread on real sockets: each
accepted connection gets one to the target, and bytes are copied both ways
in chunks of what one read returns (at most CHUNK). Per direction ("up":
client -> target, "down": target -> client) and per chunk it can:

- delay: deliver each chunk latency_s +- jitter_s after it arrived, order kept
  (a chunk never overtakes the one before it);
- cap the bandwidth: bytes_per_s for the direction, shared by all of the
  proxy's connections (one link), paced in slices of PACE_SLICE bytes;
- reset: abort both sockets with an RST (SO_LINGER 0, then close), with
  reset_p per chunk, or with reset_conn_p per connection at a moment drawn in
  its first reset_within_s seconds;
- stall: with stall_p per chunk, hold that chunk and everything behind it for
  stall_s seconds (reading goes on until the queue is full, as a link whose
  window fills);
- truncate: with truncate_p per chunk, write a strict prefix of it, then
  close both sides (FIN: the reader sees a message cut short, then EOF).

The randomness is seeded: each connection and direction draws from its own
generator, seeded by (seed, proxy name, connection number, direction), so a
run's decisions for the n-th connection's k-th chunk are the same in every
run with that seed. (Which bytes make up the k-th chunk depends on TCP's
timing, so a failure reproduces in kind, not necessarily byte for byte.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from types import TracebackType

from vfl.cli.federation import LocalFederation, ServiceProcess

CHUNK = 64 << 10  # bytes read at once from one side
QUEUE_CHUNKS = 64  # chunks in flight per direction before the proxy stops reading
PACE_SLICE = 4 << 10  # the bandwidth cap paces writes in slices this large
CONNECT_TIMEOUT_S = 10.0
DIRECTIONS = ("up", "down")


@dataclass(frozen=True)
class Faults:
    """What to do to one direction of every connection (all off by default)."""

    latency_s: float = 0.0
    jitter_s: float = 0.0  # each chunk's delay is latency_s + uniform(-jitter_s, jitter_s), at least 0
    bytes_per_s: float = 0.0  # bandwidth cap of the direction (0: none)
    reset_p: float = 0.0  # per chunk: RST both sides instead of forwarding it
    reset_conn_p: float = 0.0  # per connection: RST it at a moment in its first reset_within_s seconds
    reset_within_s: float = 2.0
    stall_p: float = 0.0  # per chunk: hold this direction for stall_s seconds first
    stall_s: float = 0.0
    truncate_p: float = 0.0  # per chunk: forward a strict prefix, then close both sides
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("reset_p", "reset_conn_p", "stall_p", "truncate_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {getattr(self, name)}")
        for name in ("latency_s", "jitter_s", "bytes_per_s", "reset_within_s", "stall_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")

    @property
    def delays(self) -> bool:
        return self.latency_s > 0 or self.jitter_s > 0


@dataclass
class ProxyStats:
    """What the proxy did, over its lifetime (both directions unless named)."""

    connections: int = 0  # accepted
    open: int = 0  # open now
    upstream_failures: int = 0  # accepted, but the target could not be reached (the client is reset)
    bytes_up: int = 0  # forwarded client -> target
    bytes_down: int = 0  # forwarded target -> client
    chunks: int = 0  # forwarded whole
    resets: int = 0  # connections reset by a fault (per chunk or per connection)
    stalls: int = 0
    truncations: int = 0

    @property
    def faults(self) -> int:
        return self.resets + self.stalls + self.truncations

    def since(self, earlier: ProxyStats) -> ProxyStats:
        """What happened between `earlier` and this snapshot."""
        names = [f.name for f in dataclasses.fields(self)]
        return ProxyStats(**{n: getattr(self, n) - getattr(earlier, n) for n in names})

    def describe(self) -> str:
        return (
            f"{self.connections} connections, {(self.bytes_up + self.bytes_down) / 1e3:.0f} kB, "
            f"{self.resets} resets, {self.stalls} stalls, {self.truncations} truncations"
        )


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN: SO_LINGER on with a zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)  # one per connection, kept in a set by identity
class _Connection:
    number: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def writers(self) -> Iterator[asyncio.StreamWriter]:
        yield self.client
        if self.upstream is not None:
            yield self.upstream

    def reset(self) -> None:
        for w in self.writers():
            _abort_with_rst(w)
        self.ended.set()

    def close(self) -> None:
        for w in self.writers():
            w.close()
        self.ended.set()


class FaultProxy:
    """Listens on 127.0.0.1 (or `host`), forwards to `target`, injects `faults`
    (both directions) or `up` / `down` (one direction each). `name` tells two
    proxies with the same seed apart (their draws differ)."""

    def __init__(
        self,
        target: tuple[str, int],
        faults: Faults | None = None,
        *,
        up: Faults | None = None,
        down: Faults | None = None,
        host: str = "127.0.0.1",
        name: str = "proxy",
    ) -> None:
        self.target = target
        self.name = name
        self._faults: dict[str, Faults] = {}
        self.set_faults(faults, up=up, down=down)
        self._stats = ProxyStats()
        self._lock = threading.Lock()
        self._sock = socket.create_server((host, 0))
        self._sock.setblocking(False)
        self.host, self.port = self._sock.getsockname()[:2]
        self._ids = itertools.count(1)
        self._connections: set[_Connection] = set()
        self._next_free = dict.fromkeys(DIRECTIONS, 0.0)  # the bandwidth cap's clock, per direction
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # --- the API ---------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    def faults(self, direction: str) -> Faults:
        return self._faults[direction]

    def set_faults(self, faults: Faults | None = None, *, up: Faults | None = None, down: Faults | None = None) -> None:
        """Replace the faults (from the next chunk, and for new connections);
        `faults` for both directions, `up` / `down` override one."""
        both = faults or Faults()
        self._faults = {"up": up or both, "down": down or both}  # one assignment: atomic for the loop thread

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name=f"faultproxy-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"fault proxy {self.name} did not start")
        return self

    def stop(self) -> None:
        """Stop listening and reset every open connection."""
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self._sock.close()

    def reset_all(self) -> int:
        """Reset every open connection now; returns how many."""
        if self._loop is None:
            return 0

        async def reset() -> int:
            conns = list(self._connections)
            for c in conns:
                c.reset()
            self._count(resets=len(conns))
            return len(conns)

        return asyncio.run_coroutine_threadsafe(reset(), self._loop).result(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()

    # --- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, sock=self._sock, limit=CHUNK)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for c in list(self._connections):
                c.reset()
        # Let the handlers see their connections end.
        await asyncio.sleep(0)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def _rng(self, conn: int, purpose: str) -> random.Random:
        seed = self._faults["up" if purpose.startswith("up") else "down"].seed
        return random.Random(f"{seed}/{self.name}/{conn}/{purpose}")  # str seeds are hashed stably

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(next(self._ids), writer)
        tasks: list[asyncio.Task[None]] = []
        self._count(connections=1, open=1)
        try:
            self._connections.add(conn)
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target, limit=CHUNK), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                self._count(upstream_failures=1)
                conn.reset()  # as a refused connection looks to the client
                return
            conn.upstream = up_writer
            tasks = [
                asyncio.create_task(self._pipe(conn, reader, up_writer, "up")),
                asyncio.create_task(self._pipe(conn, up_reader, writer, "down")),
            ]
            per_conn = self._faults["up"]
            rng = self._rng(conn.number, "up-connection")
            if per_conn.reset_conn_p and rng.random() < per_conn.reset_conn_p:
                tasks.append(asyncio.create_task(self._reset_later(conn, rng.uniform(0, per_conn.reset_within_s))))
            # Until both directions have ended, or a fault ended the connection.
            ended = asyncio.create_task(conn.ended.wait())
            while not ended.done() and not all(t.done() for t in tasks[:2]):
                await asyncio.wait([ended, *tasks[:2]], return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not conn.ended.is_set():
                conn.close()
            self._connections.discard(conn)
            self._count(open=-1)

    async def _reset_later(self, conn: _Connection, after_s: float) -> None:
        await asyncio.sleep(after_s)
        # Drawn when the connection opened; dropped if set_faults turned it off since.
        if not conn.ended.is_set() and self._faults["up"].reset_conn_p > 0:
            self._count(resets=1)
            conn.reset()

    async def _pipe(
        self, conn: _Connection, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str
    ) -> None:
        """Read chunks and stamp their delivery time; a second task delivers
        them, so that latency delays bytes without throttling the pipe."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(QUEUE_CHUNKS)
        delays = self._rng(conn.number, f"{direction}-delay")

        async def read() -> None:
            due = 0.0
            while True:
                data: bytes | None
                try:
                    data = await src.read(CHUNK)
                except OSError:
                    data = None  # reset by that end: passed on as a reset, not as an end
                f = self._faults[direction]
                delay = max(0.0, f.latency_s + delays.uniform(-f.jitter_s, f.jitter_s)) if f.delays else 0.0
                due = max(due, loop.time() + delay)
                await queue.put((due, data))
                if not data:
                    return

        reading = asyncio.create_task(read())
        try:
            await self._deliver(conn, queue, dst, direction)
        except OSError:
            conn.reset()  # dst is gone: so is the connection, at both ends
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    async def _deliver(
        self,
        conn: _Connection,
        queue: asyncio.Queue[tuple[float, bytes | None]],
        dst: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        decide = self._rng(conn.number, f"{direction}-faults")
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if data is None:
                conn.reset()
                return
            if not data:
                if dst.can_write_eof():
                    with suppress(OSError):
                        dst.write_eof()  # pass the half-close on; the other direction goes on
                return
            f = self._faults[direction]
            # One draw per fault per chunk, always, so that turning one fault
            # on does not shift the draws of the others.
            reset, stall, truncate, cut = decide.random(), decide.random(), decide.random(), decide.random()
            if reset < f.reset_p:
                self._count(resets=1)
                conn.reset()
                return
            if stall < f.stall_p and f.stall_s > 0:
                self._count(stalls=1)
                await asyncio.sleep(f.stall_s)
            if truncate < f.truncate_p and len(data) > 1:
                self._count(truncations=1)
                part = data[: 1 + int(cut * (len(data) - 1))]
                await self._write(dst, part, direction, f)
                conn.close()
                return
            await self._write(dst, data, direction, f)
            self._count(chunks=1)

    async def _write(self, dst: asyncio.StreamWriter, data: bytes, direction: str, f: Faults) -> None:
        loop = asyncio.get_running_loop()
        slices = [data] if not f.bytes_per_s else [data[i : i + PACE_SLICE] for i in range(0, len(data), PACE_SLICE)]
        for part in slices:
            if f.bytes_per_s:
                # The link is busy until the bytes before these have gone.
                start = max(loop.time(), self._next_free[direction])
                self._next_free[direction] = start + len(part) / f.bytes_per_s
                if (wait := start - loop.time()) > 0:
                    await asyncio.sleep(wait)
            dst.write(part)
            await dst.drain()
            self._count(**{f"bytes_{direction}": len(part)})
            if f.bytes_per_s and (wait := self._next_free[direction] - loop.time()) > 0:
                await asyncio.sleep(wait)


# --- a federation with a proxy on each link ------------------------------------------


@dataclass
class ProxiedService(ServiceProcess):
    """A service as its callers see it: at its proxy's address."""

    via: str = ""

    @property
    def address(self) -> str:
        return self.via


@dataclass
class FaultyFederation(LocalFederation):
    """LocalFederation with a FaultProxy on A -> C ("a-c") and on C -> B ("c-b").

    LocalFederation gives every caller a service's `.address`: C's upstream
    and A's CONNECT target (which C requires to be its upstream) are B's,
    A's assistant is C's. Here those are the proxies' addresses, so A's
    tunnel runs A -> proxy -> C -> proxy -> B, end to end (TLS with tls=True)
    as without them. The client -> A connection is direct. Without the
    assistant, A -> B goes through "c-b" alone. A restarted service keeps its
    port, so its proxy stays in front of it.
    """

    faults: Faults = field(default_factory=Faults)
    proxies: dict[str, FaultProxy] = field(default_factory=dict)

    LINKS = {"assistant": "a-c", "passive": "c-b"}

    def start(self, name: str) -> ServiceProcess:
        svc = super().start(name)
        link = self.LINKS.get(name)
        if link is None:
            return svc
        if link not in self.proxies:
            self.proxies[link] = FaultProxy(("127.0.0.1", svc.port), self.faults, name=link).start()
        plain = {f.name: getattr(svc, f.name) for f in dataclasses.fields(ServiceProcess)}
        proxied = ProxiedService(**plain, via=self.proxies[link].address)
        self.services[name] = proxied
        return proxied

    def set_faults(self, faults: Faults | None = None, **per_link: Faults) -> None:
        """`faults` on every link (both directions), or per link: set_faults(**{"a-c": ..., "c-b": ...})."""
        for link, proxy in self.proxies.items():
            proxy.set_faults(per_link.get(link, faults))

    def stats(self) -> dict[str, ProxyStats]:
        return {link: proxy.stats for link, proxy in self.proxies.items()}

    def stop(self) -> None:
        super().stop()
        for proxy in self.proxies.values():
            proxy.stop()
