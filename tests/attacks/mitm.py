"""A malicious assistant for the attack tests: an HTTP CONNECT proxy in the
test process that A is pointed at (VFL_ASSISTANT_ADDRESS) instead of the
real C. It tunnels to any target it is asked for (no token, no allow-list),
keeps a copy of every byte it relays, and can tamper with the stream: flip a
byte, replay an earlier TLS record, or swap two records -- what an assistant
(or anyone on the A-C-B path) could try. Nothing here is imported by the
product.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

HEADER = 5  # TLS record header: type, version (2), length (2)
APPLICATION_DATA = 23


def tls_records(stream: bytes) -> list[tuple[int, int, bytes]]:
    """(content type, version, payload) of each TLS record in `stream`;
    raises ValueError if the bytes are not a sequence of TLS records."""
    out, i = [], 0
    while i < len(stream):
        if len(stream) - i < HEADER:
            raise ValueError(f"truncated record header at {i}")
        ctype, version, length = (
            stream[i],
            int.from_bytes(stream[i + 1 : i + 3], "big"),
            int.from_bytes(stream[i + 3 : i + 5], "big"),
        )
        if ctype not in (20, 21, 22, 23) or version not in (0x0301, 0x0302, 0x0303) or length > (1 << 14) + 256:
            raise ValueError(f"not a TLS record at {i}: type {ctype} version {version:#06x} length {length}")
        out.append((ctype, version, stream[i + HEADER : i + HEADER + length]))
        i += HEADER + length
    return out


# tamper(tunnel, direction, record) -> the records to send instead (record: header + payload).
Tamper = Callable[[int, str, bytes], list[bytes]]


@dataclass
class MaliciousRelay:
    """Start with `start()` (returns host:port), stop with `stop()`.
    `captured[(tunnel, direction)]` is every byte relayed, direction
    "a_to_b" or "b_to_a". With `tamper`, the tunnelled stream is cut into
    TLS records (after the CONNECT) and each goes through `tamper`."""

    tamper: Tamper | None = None
    upstream: str | None = None  # tunnel here whatever the CONNECT names
    captured: dict[tuple[int, str], bytearray] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    address: str = ""
    _sock: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _tunnels: int = 0
    _stopping: bool = False

    def start(self) -> str:
        self._sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        return self.address

    def stop(self) -> None:
        self._stopping = True
        if self._sock is not None:
            self._sock.close()

    def stream(self, tunnel: int, direction: str) -> bytes:
        return bytes(self.captured.get((tunnel, direction), b""))

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data:
                conn.close()
                return
            head += data
        head, rest = head.split(b"\r\n\r\n", 1)
        target = head.split(b"\r\n")[0].split(b" ")[1].decode()
        host, _, port = (self.upstream or target).rpartition(":")
        with self._lock:
            self._tunnels += 1
            number = self._tunnels
            self.targets.append(target)
        try:
            up = socket.create_connection((host, int(port)), timeout=10)
            up.settimeout(None)
        except OSError:
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            conn.close()
            return
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=self._pipe, args=(conn, up, number, "a_to_b", rest), daemon=True).start()
        self._pipe(up, conn, number, "b_to_a", b"")

    def _pipe(self, src: socket.socket, dst: socket.socket, number: int, direction: str, pending: bytes) -> None:
        buf = bytearray(pending)
        try:
            while True:
                if self.tamper is None:
                    out, buf = bytes(buf), bytearray()
                else:
                    out = b""
                    while len(buf) >= HEADER:  # whole records only
                        end = HEADER + int.from_bytes(buf[3:5], "big")
                        if len(buf) < end:
                            break
                        record, buf = bytes(buf[:end]), buf[end:]
                        out += b"".join(self.tamper(number, direction, record))
                if out:
                    with self._lock:
                        self.captured.setdefault((number, direction), bytearray()).extend(out)
                    dst.sendall(out)
                data = src.recv(65536)
                if not data:
                    break
                buf.extend(data)
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
