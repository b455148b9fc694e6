"""Paillier through python-paillier (phe), with gmpy2 arithmetic when present.

The reference backend, Paillier only: phe generates keys, encrypts (fresh randomness from the OS
CSPRNG) and decrypts (CRT). The matrix-vector product is a product of powers
of ciphertexts; negative coefficients use the ciphertext's inverse, so no
exponent is near n.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import phe
from phe.util import invert, mulmod, powmod

from vfl.common.crypto.backend import CipherVector, HEBackend, PrivateKey, PublicKey, register_backend
from vfl.common.errors import InvalidArgument


def _phe_public(key: PublicKey) -> phe.PaillierPublicKey:
    return phe.PaillierPublicKey(key.n)


@register_backend
class PheBackend(HEBackend):
    name = "phe"

    def __init__(self) -> None:
        self._phe_private: dict[bytes, phe.PaillierPrivateKey] = {}

    def generate_keypair(self, bits: int) -> PrivateKey:
        public, private = phe.generate_paillier_keypair(n_length=bits)
        return PrivateKey(PublicKey(public.n), private.p, private.q)

    def encrypt(self, key: PublicKey, plaintexts: Sequence[int], hiding: bool = False) -> CipherVector:
        # phe draws r uniform in [1, n) from the OS CSPRNG and computes r^n mod
        # n^2 in full: every encryption is already a hiding one.
        self.require_scheme(key, "encrypt")
        public = _phe_public(key)
        for i, m in enumerate(plaintexts):
            if not 0 <= m < key.n:
                raise InvalidArgument(f"plaintext {i}: expected a residue in [0, n)")
        return CipherVector(key, tuple(public.raw_encrypt(int(m)) for m in plaintexts))

    def decrypt(self, key: PrivateKey, ciphers: CipherVector) -> list[int]:
        ciphers.require_key(key.public, "decrypt")
        self.require_scheme(key.public, "decrypt")
        private = self._phe_private.get(key.public.fingerprint)
        if private is None:
            private = phe.PaillierPrivateKey(_phe_public(key.public), key.p, key.q)
            self._phe_private[key.public.fingerprint] = private
        return [private.raw_decrypt(c) for c in ciphers.values]

    def add(self, a: CipherVector, b: CipherVector) -> CipherVector:
        self.require_scheme(a.key, "add")
        b.require_key(a.key, "add")
        a.require_length(len(b), "add")
        n_square = a.key.n_square
        return CipherVector(a.key, tuple(mulmod(x, y, n_square) for x, y in zip(a.values, b.values, strict=True)))

    def matvec(self, matrix: np.ndarray, ciphers: CipherVector) -> CipherVector:
        self.require_scheme(ciphers.key, "matvec")
        rows, cols = matrix.shape
        ciphers.require_length(cols, "matvec")
        n_square = ciphers.key.n_square
        inverses: list[int] | None = None
        out = []
        for i in range(rows):
            acc = 1
            for j in range(cols):
                coef = int(matrix[i, j])
                if coef > 0:
                    acc = mulmod(acc, powmod(ciphers.values[j], coef, n_square), n_square)
                elif coef < 0:
                    if inverses is None:
                        inverses = [invert(c, n_square) for c in ciphers.values]
                    acc = mulmod(acc, powmod(inverses[j], -coef, n_square), n_square)
            out.append(acc)
        return CipherVector(ciphers.key, tuple(out))
