"""Domain errors. They know nothing of gRPC: the one table that maps them
to status codes is `vfl.common.rpc.STATUS_OF`, so that the protocol and the
crypto import no RPC library (lint's import contract checks it).

Servicers raise these; `vfl.common.rpc` turns them into statuses. Messages name
the field and what was expected, and never carry a secret value.
"""

from __future__ import annotations


class VflError(Exception):
    """Base of all domain errors (an unexpected one is an internal error)."""


class InvalidArgument(VflError):
    """A field has the wrong shape, type or range."""


class NotFound(VflError):
    """An unknown job, model or id."""


class FailedPrecondition(VflError):
    """The request is well formed but not acceptable now: wrong key
    fingerprint, a step out of order, missing ids, a model/data mismatch."""


class AlreadyExists(VflError):
    """A job, model or alignment id that is taken."""


class Unavailable(VflError):
    """The peer party could not be reached."""


class OutOfRange(VflError):
    """A value would overflow the plaintext space, or a decrypted value is
    outside the range the step allows."""


class ResourceExhausted(VflError):
    """A budget set by the serving party's policy is used up (models kept,
    prediction ids)."""


class DamagedFile(VflError):
    """A file in a party's data directory failed its checks (not JSON,
    truncated, wrong format or version, checksum mismatch). `path` is the
    file, `reason` what is wrong; neither carries the file's content."""

    def __init__(self, path: object, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ConfigError(Exception):
    """Bad service configuration, reported at start-up."""


class PeerError(VflError):
    """The peer party refused a call; `status` is the name of the peer's
    status code (INVALID_ARGUMENT, ...), which this party answers with too."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
