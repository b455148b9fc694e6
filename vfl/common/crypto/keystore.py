"""Each party's key pair in its own data directory, owner-only.

Generated on first start, reused after a restart, never sent anywhere: only
the public key leaves through key exchange.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vfl.common.crypto.backend import SCHEME_OU, SCHEME_PAILLIER, HEBackend, PrivateKey
from vfl.common.errors import ConfigError, DamagedFile, VflError
from vfl.common.storage import ensure_private_dir, read_record, write_record

log = logging.getLogger(__name__)

MIN_KEY_BITS = 2048
MIN_TEST_KEY_BITS = 256
# OU's plaintext space is a third of the modulus; masked 128-bit values need 768 bits.
MIN_TEST_KEY_BITS_OU = 768
KEY_FILE = "keys/private_key.json"
LEGACY_KEY_FILE = "keys/paillier_private.json"  # written by v0.1 (Paillier only)


def key_path(data_dir: Path) -> Path:
    legacy = data_dir / LEGACY_KEY_FILE
    return legacy if legacy.exists() and not (data_dir / KEY_FILE).exists() else data_dir / KEY_FILE


KIND = "private-key"


def read_private_key(path: Path) -> PrivateKey:
    """The stored key pair; refused if anyone but the owner can read it, and
    if the file is damaged (one line naming VFL_DATA_DIR and the file). The
    file is never moved or replaced here: the models trained with the key
    need it, so the operator decides."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{path}: private key file must be owner-only (mode 600), is {mode:o}")
    try:
        body = read_record(path, KIND)
        return PrivateKey.from_dict(body)
    except DamagedFile as exc:
        reason = exc.reason
    except (KeyError, TypeError, ValueError, VflError) as exc:
        # A legacy (unchecked) file whose JSON parses but is no key pair.
        reason = f"not a valid private key ({type(exc).__name__})"
    data_dir = path.parent.parent
    raise ConfigError(
        f"VFL_DATA_DIR: {data_dir}: {path.relative_to(data_dir)} is damaged ({reason}); the models trained with "
        "this party's key need it: restore the file from a backup, or move it away to have a new key generated"
    )


def check_key_bits(bits: int, test_mode: bool, scheme: str = SCHEME_PAILLIER) -> None:
    floor = MIN_KEY_BITS
    if test_mode:
        floor = MIN_TEST_KEY_BITS_OU if scheme == SCHEME_OU else MIN_TEST_KEY_BITS
    if bits < floor:
        hint = "" if test_mode else " (smaller keys need VFL_TEST_MODE=true)"
        raise ConfigError(f"VFL_KEY_BITS: expected at least {floor}, got {bits}{hint}")


def load_or_create_keypair(data_dir: Path, backend: HEBackend, bits: int, test_mode: bool) -> PrivateKey:
    check_key_bits(bits, test_mode, backend.own_scheme)
    path = key_path(data_dir)
    if path.exists():
        key = read_private_key(path)
        if key.public.scheme != backend.own_scheme:
            raise ConfigError(
                f"VFL_BACKEND: the stored key in {path} is a {key.public.scheme!r} key, backend {backend.name!r} "
                f"uses {backend.own_scheme!r} keys; models trained with the stored key need it"
            )
        if key.public.bits != bits:
            raise ConfigError(f"VFL_KEY_BITS: the stored key in {path} is {key.public.bits}-bit, configured {bits}")
        log.info("event=key_loaded fingerprint=%s bits=%d", key.public.fingerprint.hex()[:16], bits)
        return key
    ensure_private_dir(path.parent)
    key = backend.generate_keypair(bits)
    write_record(path, KIND, key.to_dict(), mode=0o600)
    log.info("event=key_generated fingerprint=%s bits=%d", key.public.fingerprint.hex()[:16], bits)
    return key


__all__ = ["MIN_KEY_BITS", "check_key_bits", "key_path", "load_or_create_keypair", "read_private_key"]
