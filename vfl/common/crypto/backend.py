"""Key types, ciphertext vectors and the vectorised backend interface.

Two schemes share one interface: Paillier (ciphertexts mod n^2, plaintexts
mod the public n) and Okamoto-Uchiyama (n = p^2 q, ciphertexts mod n,
plaintexts mod the secret p). A ciphertext never exists without the key it is
under: `CipherVector` holds its `PublicKey`, and the wire format carries the
key's fingerprint beside the bytes.
"""

from __future__ import annotations

import hashlib
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import gmpy2
import numpy as np

from vfl.common.errors import FailedPrecondition, InvalidArgument, OutOfRange

SCHEME_PAILLIER = "paillier"
SCHEME_OU = "ou"
SCHEMES = (SCHEME_PAILLIER, SCHEME_OU)

# Statistical hiding of masks where the plaintext modulus is secret (OU):
# R is uniform in [0, 2^(value_bits + MASK_STATISTICAL_BITS)).
MASK_STATISTICAL_BITS = 80


def _int_bytes(v: int, width: int) -> bytes:
    return v.to_bytes(width, "big")


@dataclass(frozen=True)
class PublicKey:
    """A public key. Paillier: modulus n, generator n + 1. OU: n = p^2 q and
    the public bases g (message) and h (randomness, h = g'^(n u))."""

    n: int
    scheme: str = SCHEME_PAILLIER
    g: int = 0
    h: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise InvalidArgument(f"public key: unknown scheme {self.scheme[:32]!r}, expected one of {SCHEMES}")

    @cached_property
    def n_square(self) -> int:
        return self.n * self.n

    @cached_property
    def cipher_modulus(self) -> int:
        """Ciphertexts are residues in [1, cipher_modulus)."""
        return self.n_square if self.scheme == SCHEME_PAILLIER else self.n

    @cached_property
    def fingerprint(self) -> bytes:
        """SHA-256 over the canonical encoding: tag || n (|| g || h for OU),
        big-endian, each at the byte width of n."""
        w = self.residue_width
        if self.scheme == SCHEME_PAILLIER:
            return hashlib.sha256(b"vfl-paillier-v1" + _int_bytes(self.n, w)).digest()
        body = _int_bytes(self.n, w) + _int_bytes(self.g, w) + _int_bytes(self.h, w)
        return hashlib.sha256(b"vfl-ou-v1" + body).digest()

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
        return (self.cipher_modulus.bit_length() + 7) // 8

    @cached_property
    def plaintext_bits(self) -> int:
        """Bits a signed plaintext may use (|v| < 2^plaintext_bits) and still
        decrypt correctly. For OU the modulus p is secret but its size is not:
        keys are generated with |p| = ceil(|n| / 3)."""
        if self.scheme == SCHEME_PAILLIER:
            return self.n.bit_length() - 2
        return (self.n.bit_length() + 2) // 3 - 2

    @property
    def mask_modulus_public(self) -> bool:
        """True when masks can be uniform modulo the (public) plaintext modulus."""
        return self.scheme == SCHEME_PAILLIER

    def masked_value_bits(self, value_bits: int) -> int:
        """Bits of a value of at most value_bits bits plus its mask."""
        if self.mask_modulus_public:
            return self.plaintext_bits
        return value_bits + MASK_STATISTICAL_BITS + 2

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheme": self.scheme, "n": f"{self.n:x}"}
        if self.scheme == SCHEME_OU:
            out |= {"g": f"{self.g:x}", "h": f"{self.h:x}"}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PublicKey:
        scheme = str(d.get("scheme", SCHEME_PAILLIER))
        if scheme == SCHEME_OU:
            return cls(int(d["n"], 16), scheme, int(d["g"], 16), int(d["h"], 16))
        return cls(int(d["n"], 16), scheme)


@dataclass(frozen=True)
class PrivateKey:
    """The secret factors. Paillier: n = p q. OU: n = p^2 q, and t, the prime
    factor of p - 1 that is the order of the message subgroup (decryption
    exponentiates by t, 224 bits, rather than by p - 1). Never leaves its party."""

    public: PublicKey
    p: int = field(repr=False)
    q: int = field(repr=False)
    t: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.public.scheme == SCHEME_PAILLIER and self.p * self.q != self.public.n:
            raise InvalidArgument("private key: p * q does not equal the public modulus n")
        if self.public.scheme == SCHEME_OU:
            if self.p * self.p * self.q != self.public.n:
                raise InvalidArgument("private key: p^2 * q does not equal the public modulus n")
            if self.t <= 1 or (self.p - 1) % self.t:
                raise InvalidArgument("private key: t must be a factor of p - 1")

    @property
    def plaintext_modulus(self) -> int:
        """Decryption returns residues modulo this."""
        return self.public.n if self.public.scheme == SCHEME_PAILLIER else self.p

    def to_dict(self) -> dict[str, Any]:
        out = self.public.to_dict() | {"p": f"{self.p:x}", "q": f"{self.q:x}"}
        if self.t:
            out["t"] = f"{self.t:x}"
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivateKey:
        return cls(PublicKey.from_dict(d), int(d["p"], 16), int(d["q"], 16), int(d.get("t", "0"), 16))


def target_fingerprint(active: PublicKey, passive: PublicKey) -> bytes:
    """Fingerprint of the target key T = (pk_A, pk_B), A's first."""
    return hashlib.sha256(b"vfl-target-v1" + active.fingerprint + passive.fingerprint).digest()


# --- masks ("decrypt with the random vector") ---------------------------------


def random_mask(key: PublicKey, length: int, value_bits: int) -> tuple[int, ...]:
    """R from the OS CSPRNG: uniform modulo n where n is the plaintext modulus
    (perfect hiding, Paillier); otherwise 2^value_bits plus a uniform value of
    value_bits + 80 bits (statistical hiding of |v| < 2^value_bits, and v + R
    is never negative), OU."""
    if key.mask_modulus_public:
        return tuple(secrets.randbelow(key.n) for _ in range(length))
    if key.masked_value_bits(value_bits) > key.plaintext_bits:
        raise OutOfRange(f"mask: {value_bits}-bit values plus mask do not fit the {key.bits}-bit key")
    offset = 1 << value_bits
    return tuple(offset + secrets.randbits(value_bits + MASK_STATISTICAL_BITS) for _ in range(length))


def check_masked_plaintexts(key: PrivateKey, values: Sequence[int], value_bits: int, what: str) -> None:
    """Decryptor's guard before returning decrypted values to the peer. With a
    secret plaintext modulus (OU), a crafted ciphertext decrypts to a residue
    mod p that can reveal p: return only what a masked value of value_bits
    bits can be."""
    if key.public.mask_modulus_public:
        return
    limit = 1 << key.public.masked_value_bits(value_bits)
    if any(v >= limit for v in values):
        raise OutOfRange(f"{what}: a decrypted value is larger than any masked value can be; refused")


def unmask(key: PublicKey, z: Sequence[int], mask: Sequence[int]) -> list[int]:
    """h = z - R as signed integers."""
    if key.mask_modulus_public:
        n, half = key.n, key.n // 2
        out = []
        for zi, ri in zip(z, mask, strict=True):
            v = (zi - ri) % n
            out.append(v - n if v > half else v)
        return out
    return [zi - ri for zi, ri in zip(z, mask, strict=True)]


@dataclass(frozen=True)
class CipherVector:
    """Ciphertexts under one public key, as integers in [1, cipher_modulus)."""

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

    Plaintexts going in are residues modulo the public n (negatives as
    n - |v|, see `vfl.common.crypto.fixedpoint`); decryption returns residues
    modulo the private key's plaintext modulus. Matrices are signed integer
    numpy arrays.
    """

    name: str
    # Scheme of the keys this backend generates for its own party.
    own_scheme: str = SCHEME_PAILLIER
    # Schemes whose ciphertexts this backend can compute on (a peer's key may
    # use another scheme than this party's own).
    schemes: tuple[str, ...] = (SCHEME_PAILLIER,)

    def require_scheme(self, key: PublicKey, what: str) -> None:
        if key.scheme not in self.schemes:
            raise FailedPrecondition(
                f"{what}: the key uses scheme {key.scheme!r}, which backend {self.name!r} cannot compute on "
                f"(it supports {', '.join(self.schemes)})"
            )

    @abstractmethod
    def generate_keypair(self, bits: int) -> PrivateKey: ...

    def set_workers(self, workers: int) -> None:
        """Processes for large products. Optional; ignored by default."""
        return None

    def prepare(self, key: PublicKey | PrivateKey) -> None:
        """Precompute what operations under this key need (tables, pools),
        ahead of the first job. Optional."""
        return None

    @abstractmethod
    def encrypt(self, key: PublicKey, plaintexts: Sequence[int], hiding: bool = False) -> CipherVector:
        """Fresh encryptions of residues in [0, n).

        hiding=True: randomness uniform over the scheme's whole randomness
        group (Paillier r^n, r uniform in Z_n^*; OU s^n mod n, s uniform in
        Z_n^*), so that multiplied into any ciphertext it leaves that
        ciphertext's randomness independent of what it was, whatever
        randomness the key holder chose. Required for every encryption that
        masks or re-randomises a value going back to the key holder (step 3,
        the loss share, prediction). hiding=False may use cheaper
        short-exponent randomness: only for a party's own values under its
        own key, or where nothing is multiplied in."""

    @abstractmethod
    def decrypt(self, key: PrivateKey, ciphers: CipherVector) -> list[int]:
        """Residues modulo key.plaintext_modulus."""

    @abstractmethod
    def add(self, a: CipherVector, b: CipherVector) -> CipherVector:
        """Element-wise [[a + b]]."""

    @abstractmethod
    def matvec(self, matrix: np.ndarray, ciphers: CipherVector) -> CipherVector:
        """[[M v]] for a signed integer matrix M (k x m) and [[v]] of length m."""

    def multiply(self, ciphers: CipherVector, scalars: Sequence[int]) -> CipherVector:
        """Element-wise [[v_i * k_i]] for signed integers k_i (a negative one
        through the ciphertext's inverse). Not re-randomised: the caller adds
        a fresh hiding encryption before the result goes back to the key holder."""
        self.require_scheme(ciphers.key, "multiply")
        ciphers.require_length(len(scalars), "multiply")
        modulus = gmpy2.mpz(ciphers.key.cipher_modulus)
        out = []
        for c, k in zip(ciphers.values, scalars, strict=True):
            base = gmpy2.mpz(c) if k >= 0 else gmpy2.invert(gmpy2.mpz(c), modulus)
            out.append(int(gmpy2.powmod(base, abs(int(k)), modulus)))
        return CipherVector(ciphers.key, tuple(out))

    def rerandomise(self, ciphers: CipherVector) -> CipherVector:
        """Multiply each ciphertext by a fresh hiding encryption of zero."""
        return self.add(ciphers, self.encrypt(ciphers.key, [0] * len(ciphers), hiding=True))


_BACKENDS: dict[str, type[HEBackend]] = {}
DEFAULT_BACKEND = "ou"


def register_backend(cls: type[HEBackend]) -> type[HEBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    from vfl.common.crypto import fast_backend, phe_backend  # noqa: F401

    return sorted(_BACKENDS)


def get_backend(name: str) -> HEBackend:
    # Import here so that registering backends does not create an import cycle.
    from vfl.common.crypto import fast_backend, phe_backend  # noqa: F401

    try:
        return _BACKENDS[name]()
    except KeyError:
        raise InvalidArgument(f"unknown crypto backend {name!r}, expected one of {sorted(_BACKENDS)}") from None
