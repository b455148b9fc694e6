"""Start-up of a data party (A or B): backend, own CSV, own key pair."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from common.crypto import HEBackend, PrivateKey, get_backend
from common.crypto.keystore import MIN_KEY_BITS, MIN_TEST_KEY_BITS, load_or_create_keypair
from common.data import PartyData, load_party_csv
from common.errors import ConfigError, InvalidArgument
from common.metrics import TimedBackend
from common.settings import PartySettings


@dataclass(frozen=True)
class PartyResources:
    backend: HEBackend
    data: PartyData
    key: PrivateKey
    min_peer_bits: int  # the smallest peer key this party accepts


def load_party(settings: PartySettings, label_column: str | None = None) -> PartyResources:
    """Everything a party loads at start; a problem exits 2 with one line."""
    try:
        backend = TimedBackend(get_backend(settings.backend))
        data = load_party_csv(settings.data_csv, settings.id_column, label_column)
        key = load_or_create_keypair(settings.data_dir, backend, settings.key_bits, settings.test_mode)
    except (ConfigError, InvalidArgument, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
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
