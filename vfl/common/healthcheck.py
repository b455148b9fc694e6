"""Container healthcheck: `python -m vfl.common.healthcheck HOST:PORT [--timeout S] [--tls-dir DIR --tls-name NAME]`,
or `python -m vfl.common.healthcheck --http HOST:PORT` for the assistant (a CONNECT proxy, no gRPC).

Calls grpc.health.v1 Health/Check for the overall status (service "") and
exits 0 if it is SERVING, 1 otherwise (including unreachable or timed out).
Prints one line either way, so `docker inspect` shows why a check failed.
With --tls-dir (or --ca, --cert and --key) it connects with mutual TLS as
that identity (any authenticated identity may check health); without, in
plaintext (a service with VFL_INSECURE=true). With --http it sends
`GET /healthz` instead and wants `200` (the assistant's tunnel port).
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vfl.common.tls import TlsConfig, TlsError, TlsFiles


def check(address: str, timeout_s: float, tls: TlsConfig | None = None) -> tuple[bool, str]:
    """(serving, one-line description) for the server at `address`."""
    try:
        # Not vfl.common.rpc.open_channel: this check runs every few seconds, so it imports little.
        if tls is None:
            channel = grpc.insecure_channel(address)
        else:
            channel = grpc.secure_channel(address, tls.channel_credentials())
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        name = code.name if code is not None else "UNKNOWN"
        return False, f"{address} {name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address} {status}"


def check_http(address: str, timeout_s: float) -> tuple[bool, str]:
    """(serving, one-line description) for the assistant at `address`: `GET /healthz` answered 200."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + address.encode() + b"\r\n\r\n")
            status_line = sock.makefile("rb").readline(200).decode(errors="replace").strip()
    except (OSError, ValueError) as exc:
        return False, f"{address} UNREACHABLE ({exc})"
    ok = status_line.split(" ")[1:2] == ["200"]
    return ok, f"{address} {'SERVING' if ok else status_line or 'no answer'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vfl.common.healthcheck", description="exit 0 if a gRPC server reports SERVING"
    )
    parser.add_argument("address", help="HOST:PORT of a gRPC server (of the assistant, with --http)")
    parser.add_argument("--http", action="store_true", help="GET /healthz over HTTP/1.1 (the assistant)")
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline of the Check call, seconds")
    parser.add_argument("--tls-dir", type=Path, help="directory with ca.pem, NAME.pem and NAME.key (mutual TLS)")
    parser.add_argument("--tls-name", default="client", help="identity whose certificate to use (default: client)")
    parser.add_argument("--ca", type=Path, help="CA certificate (overrides the one in --tls-dir)")
    parser.add_argument("--cert", type=Path, help="certificate (overrides the one in --tls-dir)")
    parser.add_argument("--key", type=Path, help="private key (overrides the one in --tls-dir)")
    args = parser.parse_args(argv)
    if args.http:
        ok, line = check_http(args.address, args.timeout)
        print(line, flush=True)
        return 0 if ok else 1
    tls = None
    if args.tls_dir or args.ca or args.cert or args.key:
        base = TlsFiles.in_dir(args.tls_dir or Path("."), args.tls_name)
        try:
            tls = TlsConfig.load(TlsFiles(args.ca or base.ca, args.cert or base.cert, args.key or base.key))
        except TlsError as exc:
            print(f"{args.address} TLS config error: {exc}", flush=True)
            return 1
    ok, line = check(args.address, args.timeout, tls)
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
