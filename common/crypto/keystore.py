"""Each party's key pair in its own data directory, owner-only.

Generated on first start, reused after a restart, never sent anywhere: only
the public key leaves through key exchange.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from common.crypto.backend import HEBackend, PrivateKey, PublicKey
from common.errors import ConfigError
from common.storage import atomic_write_text, ensure_private_dir

log = logging.getLogger(__name__)

MIN_KEY_BITS = 2048
MIN_TEST_KEY_BITS = 256
KEY_FILE = "keys/paillier_private.json"


def check_key_bits(bits: int, test_mode: bool) -> None:
    floor = MIN_TEST_KEY_BITS if test_mode else MIN_KEY_BITS
    if bits < floor:
        hint = "" if test_mode else " (smaller keys need VFL_TEST_MODE=true)"
        raise ConfigError(f"VFL_KEY_BITS: expected at least {floor}, got {bits}{hint}")


def load_or_create_keypair(data_dir: Path, backend: HEBackend, bits: int, test_mode: bool) -> PrivateKey:
    check_key_bits(bits, test_mode)
    path = data_dir / KEY_FILE
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{path}: private key file must be owner-only (mode 600), is {mode:o}")
        stored = json.loads(path.read_text())
        key = PrivateKey(PublicKey(int(stored["n"], 16)), int(stored["p"], 16), int(stored["q"], 16))
        if key.public.bits != bits:
            raise ConfigError(f"VFL_KEY_BITS: the stored key in {path} is {key.public.bits}-bit, configured {bits}")
        log.info("event=key_loaded fingerprint=%s bits=%d", key.public.fingerprint.hex()[:16], bits)
        return key
    ensure_private_dir(path.parent)
    key = backend.generate_keypair(bits)
    body = json.dumps({"scheme": key.public.scheme, "n": f"{key.public.n:x}", "p": f"{key.p:x}", "q": f"{key.q:x}"})
    atomic_write_text(path, body, mode=0o600)
    log.info("event=key_generated fingerprint=%s bits=%d", key.public.fingerprint.hex()[:16], bits)
    return key


__all__ = ["MIN_KEY_BITS", "check_key_bits", "load_or_create_keypair"]
