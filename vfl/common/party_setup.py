"""Start-up of a data party (A or B): backend, own CSV, own key pair."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from vfl.common.crypto import HEBackend, PrivateKey, get_backend
from vfl.common.crypto.keystore import MIN_KEY_BITS, MIN_TEST_KEY_BITS, load_or_create_keypair
from vfl.common.data import PartyData, load_party_table
from vfl.common.errors import ConfigError, InvalidArgument
from vfl.common.metrics import TimedBackend
from vfl.common.oserrors import StorageFull, StorageRefused, check_port_free, config_storage_error
from vfl.common.settings import PartySettings, config_errors


@dataclass(frozen=True)
class PartyResources:
    backend: HEBackend
    data: PartyData
    key: PrivateKey
    min_peer_bits: int  # the smallest peer key this party accepts


def compute_backend(settings: PartySettings) -> HEBackend:
    """The backend of VFL_BACKEND, on this process (VFL_COMPUTE=local) or on
    this party's Ray cluster (VFL_COMPUTE=ray, vfl.common.crypto.ray_engine)."""
    if settings.compute == "local":
        return get_backend(settings.backend)
    from vfl.common.crypto.ray_engine import RayBackend

    get_backend(settings.backend)  # an unknown name is VFL_BACKEND's error, before Ray starts
    block = settings.ray_min_block
    return RayBackend(settings.backend, settings.ray_address, settings.ray_workers, block, 16 * block)


def load_party(settings: PartySettings, label_column: str | None = None) -> PartyResources:
    """Everything a party loads at start; a problem exits 2 with one line.
    The port is checked first, so that a taken port is not found only after
    a key has been generated."""
    with config_errors():
        check_port_free(settings.host, settings.port)
        try:
            backend = TimedBackend(compute_backend(settings))
        except InvalidArgument as exc:
            raise ConfigError(f"VFL_BACKEND: {exc}") from None
        data = load_party_table(settings.data_csv, settings.id_column, label_column, dtype=settings.feature_dtype)
        try:
            key = load_or_create_keypair(settings.data_dir, backend, settings.key_bits, settings.test_mode)
        except OSError as exc:
            raise config_storage_error(exc, "VFL_DATA_DIR", settings.data_dir) from None
        except (StorageFull, StorageRefused) as exc:
            raise ConfigError(str(exc)) from None
    backend.set_workers(settings.crypto_workers or os.cpu_count() or 1)
    backend.prepare(key)
    # Shorter GIL hand-offs: a step handler waits less for a thread in the
    # middle of a long computation (B's own product, the randomness pool).
    sys.setswitchinterval(0.0002)
    if settings.test_mode:
        logging.getLogger("vfl").warning(
            "event=test_mode key_bits=%d: small keys allowed, not for real data", settings.key_bits
        )
    return PartyResources(backend, data, key, MIN_TEST_KEY_BITS if settings.test_mode else MIN_KEY_BITS)
