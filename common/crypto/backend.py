"""Key types, ciphertext vectors and the vectorised backend interface.

A ciphertext never exists without the key it is under: `CipherVector` holds
its `PublicKey`, and the wire format carries the key's fingerprint beside the
bytes. Operations that skip re-randomisation are named `raw_`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from common.errors import FailedPrecondition, InvalidArgument

SCHEME_PAILLIER = "paillier"


@dataclass(frozen=True)
class PublicKey:
    """A Paillier public key: modulus n, generator g = n + 1."""

    n: int
    scheme: str = SCHEME_PAILLIER

    @cached_property
    def n_square(self) -> int:
        return self.n * self.n

    @cached_property
    def fingerprint(self) -> bytes:
        """SHA-256 over the canonical encoding: tag || n, big-endian."""
        n_bytes = self.n.to_bytes((self.n.bit_length() + 7) // 8, "big")
        return hashlib.sha256(b"vfl-paillier-v1" + n_bytes).digest()

    @property
    def bits(self) -> int:
        return self.n.bit_length()

    @cached_property
    def residue_width(self) -> int:
        """Bytes per plaintext residue on the wire."""
        return (self.n.bit_length() + 7) // 8

    @cached_property
    def cipher_width(self) -> int:
        """Bytes per ciphertext on the wire."""
        return (self.n_square.bit_length() + 7) // 8


@dataclass(frozen=True)
class PrivateKey:
    """A Paillier private key: the factors of n. Never leaves its party."""

    public: PublicKey
    p: int = field(repr=False)
    q: int = field(repr=False)

    def __post_init__(self) -> None:
        if self.p * self.q != self.public.n:
            raise InvalidArgument("private key: p * q does not equal the public modulus n")


def target_fingerprint(active: PublicKey, passive: PublicKey) -> bytes:
    """Fingerprint of the target key T = (pk_A, pk_B), A's first."""
    return hashlib.sha256(b"vfl-target-v1" + active.fingerprint + passive.fingerprint).digest()


@dataclass(frozen=True)
class CipherVector:
    """Ciphertexts under one public key, as integers in [1, n^2)."""

    key: PublicKey
    values: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.values)

    def require_key(self, key: PublicKey, what: str) -> None:
        if self.key.fingerprint != key.fingerprint:
            raise FailedPrecondition(
                f"{what}: ciphertexts are under key {self.key.fingerprint.hex()[:16]}, "
                f"expected key {key.fingerprint.hex()[:16]}"
            )

    def require_length(self, length: int, what: str) -> None:
        if len(self.values) != length:
            raise InvalidArgument(f"{what}: expected {length} ciphertexts, got {len(self.values)}")


class HEBackend(ABC):
    """Vectorised additively homomorphic operations.

    Plaintexts are residues modulo n (see `common.crypto.fixedpoint` for the
    signed fixed-point encoding); matrices are signed integer numpy arrays.
    """

    name: str

    @abstractmethod
    def generate_keypair(self, bits: int) -> PrivateKey: ...

    @abstractmethod
    def encrypt(self, key: PublicKey, plaintexts: Sequence[int]) -> CipherVector:
        """Fresh encryptions (fresh randomness) of residues in [0, n)."""

    @abstractmethod
    def decrypt(self, key: PrivateKey, ciphers: CipherVector) -> list[int]:
        """Residues in [0, n)."""

    @abstractmethod
    def add(self, a: CipherVector, b: CipherVector) -> CipherVector:
        """Element-wise [[a + b]]."""

    @abstractmethod
    def matvec(self, matrix: np.ndarray, ciphers: CipherVector) -> CipherVector:
        """[[M v]] for a signed integer matrix M (k x m) and [[v]] of length m."""

    def rerandomise(self, ciphers: CipherVector) -> CipherVector:
        """Multiply each ciphertext by a fresh encryption of zero."""
        return self.add(ciphers, self.encrypt(ciphers.key, [0] * len(ciphers)))


_BACKENDS: dict[str, type[HEBackend]] = {}


def register_backend(cls: type[HEBackend]) -> type[HEBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str) -> HEBackend:
    # Import here so that registering backends does not create an import cycle.
    from common.crypto import phe_backend  # noqa: F401

    try:
        return _BACKENDS[name]()
    except KeyError:
        raise InvalidArgument(
            f"backend: unknown crypto backend {name!r}, expected one of {sorted(_BACKENDS)}"
        ) from None
