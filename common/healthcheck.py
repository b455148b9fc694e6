"""Container healthcheck: `python -m common.healthcheck HOST:PORT [--timeout S]`.

Calls grpc.health.v1 Health/Check for the overall status (service "") and
exits 0 if it is SERVING, 1 otherwise (including unreachable or timed out).
Prints one line either way, so `docker inspect` shows why a check failed.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, timeout_s: float) -> tuple[bool, str]:
    """(serving, one-line description) for the server at `address`."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        name = code.name if code is not None else "UNKNOWN"
        return False, f"{address} {name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address} {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.healthcheck", description="exit 0 if a gRPC server reports SERVING"
    )
    parser.add_argument("address", help="HOST:PORT of a gRPC server")
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline of the Check call, seconds")
    args = parser.parse_args(argv)
    ok, line = check(args.address, args.timeout)
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
