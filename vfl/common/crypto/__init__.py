"""Additively homomorphic encryption behind a vectorised backend interface.

Protocol code uses only `HEBackend` (encrypt/decrypt/add/matvec/rerandomise
over whole vectors) and the key types; it never touches a single ciphertext.
"""

from vfl.common.crypto.backend import CipherVector, HEBackend, PrivateKey, PublicKey, get_backend
from vfl.common.crypto.fixedpoint import FEATURE_SCALE_BITS, RESIDUAL_SCALE_BITS

__all__ = [
    "FEATURE_SCALE_BITS",
    "RESIDUAL_SCALE_BITS",
    "CipherVector",
    "HEBackend",
    "PrivateKey",
    "PublicKey",
    "get_backend",
]
