"""What an operating-system error in a party's own storage means, in one line.

A full disk, a quota, a read-only or foreign-owned data directory are the
operator's to fix: the message names the party, the setting and the
directory, and maps to the gRPC status a caller can act on. It carries the
errno's name, never file contents.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from vfl.common.errors import ConfigError, FailedPrecondition, ResourceExhausted, VflError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NOT_PERMITTED = {errno.EACCES, errno.EPERM, errno.EROFS}


def _what(exc: OSError) -> str:
    if exc.errno in NO_SPACE:
        return "no space left on the device (disk full or quota reached)"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in NOT_PERMITTED:
        return "permission denied; expected a directory this service's user can write"
    name = errno.errorcode.get(exc.errno or 0, "unknown error")
    return f"{name}: {os.strerror(exc.errno)}" if exc.errno else type(exc).__name__


class StorageFull(ResourceExhausted):
    """The data directory's disk is full (or its quota reached)."""


class StorageRefused(FailedPrecondition):
    """The data directory cannot be written (permissions, read-only, ...)."""


def storage_error(exc: OSError, directory: Path, option: str = "VFL_DATA_DIR") -> VflError:
    """What a caller gets when a party could not write in `directory` (under
    its `option`): RESOURCE_EXHAUSTED for a full disk, FAILED_PRECONDITION
    otherwise. The party that serves the call names itself in front."""
    message = f"{option}: {directory}: {_what(exc)}"
    return StorageFull(message) if exc.errno in NO_SPACE else StorageRefused(message)


def owned_by(party: str, exc: VflError) -> VflError:
    """`exc`, its message prefixed with the party whose storage failed."""
    if isinstance(exc, (StorageFull, StorageRefused)) and not str(exc).startswith(party):
        return type(exc)(f"{party} party: {exc}")
    return exc


def config_storage_error(exc: OSError, option: str, path: Path) -> ConfigError:
    """The same, at start-up: one line naming the setting and the path."""
    return ConfigError(f"{option}: {path}: {_what(exc)}")


def check_port_free(host: str, port: int) -> None:
    """Refuse a taken port before anything slow (key generation) runs.

    SO_REUSEADDR, as a server would set it: a port left in TIME_WAIT by our
    own previous run is free; one another process listens on is not."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"VFL_PORT: {host}:{port} is already in use; expected a free port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"VFL_HOST: {host} is not an address of this machine") from None
            if exc.errno in NOT_PERMITTED:
                raise ConfigError(f"VFL_PORT: {port}: permission denied (ports under 1024 need privileges)") from None
            raise ConfigError(f"VFL_PORT: cannot bind {host}:{port}: {_what(exc)}") from None
