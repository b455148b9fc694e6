"""Domain errors and the one table that maps them to gRPC status codes.

Servicers raise these; `common.rpc` turns them into statuses. Messages name
the field and what was expected, and never carry a secret value.
"""

from __future__ import annotations

import grpc


class VflError(Exception):
    """Base of all domain errors. `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(VflError):
    """A field has the wrong shape, type or range."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(VflError):
    """An unknown job, model or id."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(VflError):
    """The request is well formed but not acceptable now: wrong key
    fingerprint, a step out of order, missing ids, a model/data mismatch."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(VflError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(VflError):
    """The peer party could not be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class OutOfRange(VflError):
    """A value would overflow the plaintext space, or a decrypted value is
    outside the range the step allows."""

    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(VflError):
    """A budget set by the serving party's policy is used up (models kept,
    prediction ids)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DamagedFile(VflError):
    """A file in a party's data directory failed its checks (not JSON,
    truncated, wrong format or version, checksum mismatch). `path` is the
    file, `reason` what is wrong; neither carries the file's content."""

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self, path: object, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ConfigError(Exception):
    """Bad service configuration, reported at start-up."""


class PeerError(VflError):
    """The peer party refused a call; carries the peer's status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
