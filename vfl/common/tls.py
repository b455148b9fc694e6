"""Mutual TLS for every gRPC connection: a private CA, one certificate and key
per identity, and the gRPC credentials built from them.

An identity is a short name ("active", "passive", "assistant", "client" or
another client name). Its certificate carries the name as the subject CN, as
a SAN URI spiffe://vfl/<name> and as a SAN DNS name (for the three services
that is their docker-compose host name), plus DNS:localhost and IP:127.0.0.1
for local runs. The services authorise each call by the CN of the client's
certificate (vfl/common/rpc.py, AuthzInterceptor).

Layout of a certificate directory (`vfl certs --out DIR`, mode 700):

    ca.pem, ca.key            the CA (the key signs further client certificates)
    <name>.pem, <name>.key    each identity's certificate and EC P-256 key (keys mode 600)
    relay.token               the federation's relay token (mode 600): A presents it to the
                              assistant, which tunnels for no one else (not a TLS key)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vfl.common.storage import atomic_write_text, ensure_private_dir

SERVICE_IDENTITIES = ("active", "passive", "assistant")
CLIENT_IDENTITY = "client"
DEFAULT_IDENTITIES = (*SERVICE_IDENTITIES, CLIENT_IDENTITY)
SPIFFE_PREFIX = "spiffe://vfl/"
CA_CERT, CA_KEY = "ca.pem", "ca.key"
RELAY_TOKEN = "relay.token"  # noqa: S105 - the file name, not a secret
CA_DAYS = 3650
LEAF_DAYS = 825
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class TlsError(ValueError):
    """A missing or unusable TLS file; the message names the file (`path`)."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def check_identity(name: str) -> str:
    if not _NAME.match(name) or name == "ca":
        raise TlsError(
            f"identity {name!r}: expected lower-case letters, digits and '-' (a DNS label, not 'ca'), "
            "e.g. 'client' or 'client-2'"
        )
    return name


@dataclass(frozen=True)
class TlsFiles:
    """Where one identity's TLS files are: the CA certificate, its certificate and its key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path, name: str) -> TlsFiles:
        return cls(directory / CA_CERT, directory / f"{name}.pem", directory / f"{name}.key")


@dataclass(frozen=True)
class TlsConfig:
    """One identity's PEM material, checked at load: the CA, its certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes
    identity: str

    @classmethod
    def load(cls, files: TlsFiles) -> TlsConfig:
        """Read and check the three files: PEM, key matching the certificate,
        certificate signed by the CA."""
        ca_pem, cert_pem, key_pem = (_read(p) for p in (files.ca, files.cert, files.key))
        try:
            ca = x509.load_pem_x509_certificate(ca_pem)
        except ValueError:
            raise TlsError(f"{files.ca}: not a PEM certificate", files.ca) from None
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise TlsError(f"{files.cert}: not a PEM certificate", files.cert) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise TlsError(f"{files.key}: not an unencrypted PEM private key", files.key) from None
        if key.public_key() != cert.public_key():
            raise TlsError(f"{files.key}: does not match the certificate {files.cert}", files.key)
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise TlsError(f"{files.cert}: not issued by the CA in {files.ca}", files.cert) from None
        return cls(ca_pem, cert_pem, key_pem, certificate_identity(cert))

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side: present our certificate, require one from every client, signed by the CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client side: trust only the CA, present our certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{path}: no such file", path) from None
    except OSError as exc:
        raise TlsError(f"{path}: cannot read ({exc.strerror})", path) from None


def certificate_identity(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = cns[0].value if cns else ""
    return value if isinstance(value, str) else value.decode()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _create_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vfl CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write_text(out / CA_KEY, _key_pem(key), mode=0o600)
    atomic_write_text(out / CA_CERT, _cert_pem(cert), mode=0o644)
    return cert, key


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(_read(out / CA_CERT))
    if not (out / CA_KEY).exists():
        raise TlsError(f"{out / CA_KEY}: no such file (needed to issue new certificates with this CA)")
    key = serialization.load_pem_private_key(_read(out / CA_KEY), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{out / CA_KEY}: not an EC private key")
    return cert, key


def _issue(
    name: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, server: bool = False
) -> tuple[str, str]:
    key = _new_key()
    now = _now()
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(SPIFFE_PREFIX + name),
        x509.DNSName(name),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    # The services are servers and clients (A calls C, C calls B); a client identity only a client.
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server or name in SERVICE_IDENTITIES:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def create_relay_token(path: Path) -> Path:
    """Create (once) a relay token file: 256 random bits, URL-safe base64, mode 600."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, secrets.token_urlsafe(32) + "\n", mode=0o600)
    return path


def create_certs(out: Path, extra_names: Iterable[str] = (), services: Iterable[str] = ()) -> list[str]:
    """Create (once) the CA in `out`, a certificate and key for each default
    identity, each extra (client) name and each extra service (a server too:
    several passive parties, VFL_PEERS), and the relay token; existing files
    are kept. Returns the names whose certificate was created now."""
    servers = {check_identity(n) for n in services}
    names = list(dict.fromkeys([*DEFAULT_IDENTITIES, *(check_identity(n) for n in extra_names), *sorted(servers)]))
    ensure_private_dir(out)
    if (out / CA_CERT).exists():
        ca_cert, ca_key = _load_ca(out)
    else:
        ca_cert, ca_key = _create_ca(out)
    created = []
    for name in names:
        files = TlsFiles.in_dir(out, name)
        if files.cert.exists() and files.key.exists():
            continue
        cert_pem, key_pem = _issue(name, ca_cert, ca_key, server=name in servers)
        atomic_write_text(files.key, key_pem, mode=0o600)
        atomic_write_text(files.cert, cert_pem, mode=0o644)
        created.append(name)
    create_relay_token(out / RELAY_TOKEN)
    os.chmod(out, 0o700)
    return created
