"""Conversion between protos and domain types; nothing else touches _pb2.

Vectors are split into chunks of at most CHUNK_BYTES so that no message
nears gRPC's size limit, whatever the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vfl.common.crypto.backend import SCHEME_OU, SCHEMES, CipherVector, PublicKey
from vfl.common.errors import FailedPrecondition, InvalidArgument
from vfl.common.jobconfig import JobConfig, job_config
from vfl.common.metrics import CLOCK
from vfl.v1 import common_pb2

CHUNK_BYTES = 1 << 20
MAX_KEY_BITS = 8192
MAX_ROWS_PER_CHUNK = 8192
MAX_ID_LENGTH = 256


def public_key_to_proto(key: PublicKey) -> common_pb2.PublicKey:
    w = key.residue_width
    msg = common_pb2.PublicKey(scheme=key.scheme, n=key.n.to_bytes(w, "big"), fingerprint=key.fingerprint)
    if key.scheme == SCHEME_OU:
        msg.g, msg.h = key.g.to_bytes(w, "big"), key.h.to_bytes(w, "big")
    return msg


def public_key_from_proto(msg: common_pb2.PublicKey, what: str, min_bits: int) -> PublicKey:
    if msg.scheme not in SCHEMES:
        raise InvalidArgument(f"{what}.scheme: expected one of {', '.join(SCHEMES)}, got {msg.scheme[:32]!r}")
    n = int.from_bytes(msg.n, "big")
    if n.bit_length() < min_bits or n % 2 == 0:
        raise InvalidArgument(f"{what}.n: expected an odd modulus of at least {min_bits} bits")
    if n.bit_length() > MAX_KEY_BITS:
        # Tables for a huge key would take the receiving party hours to grow.
        raise InvalidArgument(f"{what}.n: expected a modulus of at most {MAX_KEY_BITS} bits, got {n.bit_length()}")
    if msg.scheme == SCHEME_OU:
        g, h = int.from_bytes(msg.g, "big"), int.from_bytes(msg.h, "big")
        for name, v in (("g", g), ("h", h)):
            if not 1 < v < n:
                raise InvalidArgument(f"{what}.{name}: expected an integer in (1, n)")
        key = PublicKey(n, SCHEME_OU, g, h)
    else:
        key = PublicKey(n)
    if msg.fingerprint != key.fingerprint:
        raise InvalidArgument(f"{what}.fingerprint: does not match SHA-256 of the key")
    return key


def _pack(values: Sequence[int], width: int) -> bytes:
    return b"".join(v.to_bytes(width, "big") for v in values)


def _unpack(data: bytes, width: int, what: str) -> list[int]:
    if width == 0 or len(data) % width:
        raise InvalidArgument(f"{what}: data length {len(data)} is not a multiple of width {width}")
    return [int.from_bytes(data[i : i + width], "big") for i in range(0, len(data), width)]


@dataclass
class StepMessage:
    """A step stream reassembled: header, rows, alignment id and vector bytes."""

    header: common_pb2.StepHeader | None = None
    rows: list[int] = field(default_factory=list)
    alignment_id: str = ""
    best_iteration: int | None = None
    cipher_fp: bytes | None = None
    cipher_width: int = 0
    cipher_data: bytearray = field(default_factory=bytearray)
    residue_fp: bytes | None = None
    residue_width: int = 0
    residue_data: bytearray = field(default_factory=bytearray)
    # With several passive parties: vectors named by party (first chunk only).
    party_ciphers: dict[str, common_pb2.CipherVector] = field(default_factory=dict)
    party_residues: dict[str, common_pb2.ResidueVector] = field(default_factory=dict)

    def digest(self) -> bytes:
        """SHA-256 of everything the message carries: a retried step is
        recognised by it, and answered by replay rather than recomputed."""
        h = hashlib.sha256()
        if self.header is not None:
            h.update(self.header.SerializeToString(deterministic=True))
        h.update(np.asarray(self.rows, dtype=np.int64).tobytes())
        h.update(b"|" + self.alignment_id.encode())
        h.update(b"|" + (b"" if self.best_iteration is None else str(self.best_iteration).encode()))
        for fp, width, data in (
            (self.cipher_fp, self.cipher_width, self.cipher_data),
            (self.residue_fp, self.residue_width, self.residue_data),
        ):
            h.update(b"|" + (fp or b"") + width.to_bytes(4, "big") + bytes(data))
        for name in sorted(self.party_ciphers):
            h.update(b"|c:" + name.encode() + b"=" + self.party_ciphers[name].SerializeToString(deterministic=True))
        for name in sorted(self.party_residues):
            h.update(b"|r:" + name.encode() + b"=" + self.party_residues[name].SerializeToString(deterministic=True))
        return h.digest()

    def party_cipher_vectors(self, keys: Mapping[str, PublicKey], what: str) -> dict[str, CipherVector]:
        """The named ciphertext vectors: one for each party of `keys`, each
        under the key named for it."""
        _require_names(self.party_ciphers, keys, what)
        return {
            name: StepMessage(cipher_fp=v.key_fingerprint, cipher_width=v.width, cipher_data=bytearray(v.data)).ciphers(
                keys[name], f"{what}[{name}]"
            )
            for name, v in self.party_ciphers.items()
        }

    def party_residue_lists(self, keys: Mapping[str, PublicKey], what: str) -> dict[str, list[int]]:
        """The named residue vectors: one for each party of `keys`, modulo the key named for it."""
        _require_names(self.party_residues, keys, what)
        return {
            name: StepMessage(
                residue_fp=v.key_fingerprint, residue_width=v.width, residue_data=bytearray(v.data)
            ).residues(keys[name], f"{what}[{name}]")
            for name, v in self.party_residues.items()
        }

    def require_header(self, what: str) -> common_pb2.StepHeader:
        if self.header is None:
            raise InvalidArgument(f"{what}: the first chunk must carry a header")
        return self.header

    def ciphers(self, key: PublicKey, what: str) -> CipherVector:
        """The ciphertexts, refused unless under `key` with the key's width."""
        with CLOCK.phase("serialise"):
            return self._ciphers(key, what)

    def _ciphers(self, key: PublicKey, what: str) -> CipherVector:
        if self.cipher_fp is None:
            raise InvalidArgument(f"{what}: expected ciphertexts, got none")
        if self.cipher_fp != key.fingerprint:
            raise FailedPrecondition(
                f"{what}: ciphertexts are under key {self.cipher_fp.hex()[:16]}, expected {key.fingerprint.hex()[:16]}"
            )
        if self.cipher_width != key.cipher_width:
            raise InvalidArgument(f"{what}: ciphertext width {self.cipher_width}, expected {key.cipher_width}")
        values = _unpack(bytes(self.cipher_data), self.cipher_width, what)
        modulus = key.cipher_modulus
        if any(not 0 < c < modulus for c in values):
            raise InvalidArgument(
                f"{what}: expected ciphertexts in [1, {'n^2' if modulus != key.n else 'n'}), got one outside"
            )
        return CipherVector(key, tuple(values))

    def residues(self, key: PublicKey, what: str) -> list[int]:
        with CLOCK.phase("serialise"):
            return self._residues(key, what)

    def _residues(self, key: PublicKey, what: str) -> list[int]:
        if self.residue_fp is None:
            raise InvalidArgument(f"{what}: expected residues, got none")
        if self.residue_fp != key.fingerprint:
            raise FailedPrecondition(f"{what}: residues are modulo another key's n")
        if self.residue_width != key.residue_width:
            raise InvalidArgument(f"{what}: residue width {self.residue_width}, expected {key.residue_width}")
        values = _unpack(bytes(self.residue_data), self.residue_width, what)
        if any(v >= key.n for v in values):
            raise InvalidArgument(f"{what}: expected residues in [0, n), got one outside")
        return values


def _require_names(given: Mapping[str, object], expected: Mapping[str, object], what: str) -> None:
    if sorted(given) != sorted(expected):
        raise InvalidArgument(f"{what}: expected vectors for parties {sorted(expected)}, got {sorted(given)}")


def step_header(job_id: str, iteration: int, target_fp: bytes) -> common_pb2.StepHeader:
    return common_pb2.StepHeader(job_id=job_id, iteration=iteration, target_fingerprint=target_fp)


def to_chunks(
    header: common_pb2.StepHeader | None,
    rows: Sequence[int] = (),
    alignment_id: str = "",
    ciphers: CipherVector | None = None,
    residues: tuple[PublicKey, Sequence[int]] | None = None,
    best_iteration: int | None = None,
    party_ciphers: Mapping[str, CipherVector] | None = None,
    party_residues: Mapping[str, tuple[PublicKey, Sequence[int]]] | None = None,
) -> Iterator[common_pb2.StepChunk]:
    """Split a step message into StepChunks of bounded size (at least one).
    Named vectors (several passive parties) all go in the first chunk: their
    RPCs are unary."""
    with CLOCK.phase("serialise"):
        parts = _build_chunks(header, rows, alignment_id, ciphers, residues)
        if best_iteration is not None:
            parts[0].best_iteration = best_iteration
        for name, c in sorted((party_ciphers or {}).items()):
            parts[0].party_ciphertexts.add(party=name, vector=cipher_vector_to_proto(c))
        for name, (key, values) in sorted((party_residues or {}).items()):
            rv = common_pb2.ResidueVector(
                key_fingerprint=key.fingerprint, width=key.residue_width, data=_pack(values, key.residue_width)
            )
            parts[0].party_residues.add(party=name, vector=rv)
        CLOCK.add_bytes_sent(sum(p.ByteSize() for p in parts))
    yield from parts


def _build_chunks(
    header: common_pb2.StepHeader | None,
    rows: Sequence[int],
    alignment_id: str,
    ciphers: CipherVector | None,
    residues: tuple[PublicKey, Sequence[int]] | None,
) -> list[common_pb2.StepChunk]:
    parts: list[common_pb2.StepChunk] = []
    rows_list = [int(r) for r in rows]
    step = MAX_ROWS_PER_CHUNK
    for s in range(0, len(rows_list), step):
        parts.append(common_pb2.StepChunk(rows=rows_list[s : s + step]))
    if ciphers is not None:
        width = ciphers.key.cipher_width
        per = max(1, CHUNK_BYTES // width)
        for s in range(0, max(len(ciphers), 1), per):
            cv = common_pb2.CipherVector(
                key_fingerprint=ciphers.key.fingerprint, width=width, data=_pack(ciphers.values[s : s + per], width)
            )
            parts.append(common_pb2.StepChunk(ciphertexts=cv))
    if residues is not None:
        key, values = residues
        width = key.residue_width
        per = max(1, CHUNK_BYTES // width)
        for s in range(0, max(len(values), 1), per):
            rv = common_pb2.ResidueVector(
                key_fingerprint=key.fingerprint, width=width, data=_pack(values[s : s + per], width)
            )
            parts.append(common_pb2.StepChunk(residues=rv))
    if not parts:
        parts.append(common_pb2.StepChunk())
    if header is not None:
        parts[0].header.CopyFrom(header)
    parts[0].alignment_id = alignment_id
    return parts


def single_chunk(parts: Sequence[common_pb2.StepChunk]) -> common_pb2.StepChunk | None:
    """The parts of a step message merged into one StepChunk, or None if that
    would exceed CHUNK_BYTES or a vector spans several chunks."""
    if sum(p.ByteSize() for p in parts) > CHUNK_BYTES:
        return None
    if sum(p.HasField("ciphertexts") for p in parts) > 1 or sum(p.HasField("residues") for p in parts) > 1:
        return None
    one = common_pb2.StepChunk()
    for part in parts:
        one.MergeFrom(part)
    return one


def fits_one_chunk(count: int, width: int) -> bool:
    """Whether `count` values of `width` bytes leave room for a header and rows
    in one chunk (a reply's size, judged before the call)."""
    return count * width <= CHUNK_BYTES // 2


def from_chunks(chunks: Iterable[common_pb2.StepChunk], what: str, max_bytes: int = 1 << 31) -> StepMessage:
    """Reassemble a step stream, checking that each vector keeps one key and width."""
    msg = StepMessage()
    total = 0
    for i, chunk in enumerate(chunks):
        total += chunk.ByteSize()
        if total > max_bytes:
            raise InvalidArgument(f"{what}: stream exceeds {max_bytes} bytes")
        if chunk.HasField("header"):
            if i != 0:
                raise InvalidArgument(f"{what}: header only allowed on the first chunk")
            msg.header = chunk.header
        if chunk.alignment_id:
            if i != 0:
                raise InvalidArgument(f"{what}: alignment_id only allowed on the first chunk")
            msg.alignment_id = chunk.alignment_id
        if chunk.HasField("best_iteration"):
            if i != 0:
                raise InvalidArgument(f"{what}: best_iteration only allowed on the first chunk")
            msg.best_iteration = chunk.best_iteration
        if chunk.party_ciphertexts or chunk.party_residues:
            if i != 0:
                raise InvalidArgument(f"{what}: party vectors only allowed on the first chunk")
            for named, into in (
                (chunk.party_ciphertexts, msg.party_ciphers),
                (chunk.party_residues, msg.party_residues),
            ):
                for item in named:
                    if item.party in into:
                        raise InvalidArgument(f"{what}: two vectors for party {item.party[:64]!r}")
                    into[item.party] = item.vector  # type: ignore[assignment]
        msg.rows.extend(chunk.rows)
        if chunk.HasField("ciphertexts"):
            cv = chunk.ciphertexts
            if msg.cipher_fp is None:
                msg.cipher_fp, msg.cipher_width = cv.key_fingerprint, cv.width
            elif (cv.key_fingerprint, cv.width) != (msg.cipher_fp, msg.cipher_width):
                raise InvalidArgument(f"{what}: ciphertext chunks under different keys or widths")
            msg.cipher_data += cv.data
        if chunk.HasField("residues"):
            rv = chunk.residues
            if msg.residue_fp is None:
                msg.residue_fp, msg.residue_width = rv.key_fingerprint, rv.width
            elif (rv.key_fingerprint, rv.width) != (msg.residue_fp, msg.residue_width):
                raise InvalidArgument(f"{what}: residue chunks modulo different keys or widths")
            msg.residue_data += rv.data
    return msg


def cipher_vector_to_proto(ciphers: CipherVector) -> common_pb2.CipherVector:
    width = ciphers.key.cipher_width
    return common_pb2.CipherVector(
        key_fingerprint=ciphers.key.fingerprint, width=width, data=_pack(ciphers.values, width)
    )


def cipher_vector_from_proto(msg: common_pb2.CipherVector, key: PublicKey, what: str) -> CipherVector:
    step = StepMessage(cipher_fp=msg.key_fingerprint, cipher_width=msg.width, cipher_data=bytearray(msg.data))
    return step.ciphers(key, what)


_CONFIG_FIELDS = list(JobConfig.model_fields)


def config_to_proto(config: JobConfig) -> common_pb2.TrainingConfig:
    return common_pb2.TrainingConfig(**config.model_dump())


def config_from_proto(msg: common_pb2.TrainingConfig) -> JobConfig:
    """Unset fields take JobConfig's defaults; bad values name the field."""
    present = {name: getattr(msg, name) for name in _CONFIG_FIELDS if msg.HasField(name)}  # type: ignore[arg-type]
    return job_config(**present)


def rows_array(rows: Sequence[int], n_rows: int, what: str) -> np.ndarray:
    arr = np.asarray(rows, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_rows):
        raise InvalidArgument(f"{what}.rows: expected positions in [0, {n_rows})")
    if len(np.unique(arr)) != arr.size:
        raise InvalidArgument(f"{what}.rows: positions must be unique")
    return arr
