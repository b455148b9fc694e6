"""Service configuration from VFL_* environment variables (pydantic-settings).

Validated at start-up: a bad option stops the service with one line that
names it.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vfl.common.crypto.backend import DEFAULT_BACKEND
from vfl.common.errors import ConfigError
from vfl.common.tls import TlsConfig, TlsError, TlsFiles, check_identity


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VFL_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(0, ge=0, le=65535, description="port to listen on; 0 picks a free one")
    port_file: Path | None = Field(None, description="write the bound port here once serving")
    data_dir: Path = Field(Path(".vfl"), description="this party's private storage (keys, models)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    transcript_path: Path | None = Field(
        None, description="tests only: append every message this service receives to this file"
    )
    max_workers: int = Field(16, ge=1, le=256, description="gRPC server threads")
    tls_dir: Path | None = Field(
        None, description="directory with ca.pem, <identity>.pem and <identity>.key (see `vfl certs`)"
    )
    tls_ca: Path | None = Field(None, description="CA certificate (PEM); overrides VFL_TLS_DIR/ca.pem")
    tls_cert: Path | None = Field(
        None, description="this service's certificate (PEM); overrides the one in VFL_TLS_DIR"
    )
    tls_key: Path | None = Field(None, description="this service's private key (PEM); overrides the one in VFL_TLS_DIR")
    insecure: bool = Field(False, description="plaintext gRPC without TLS or authorisation (local tests only)")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="serve Prometheus metrics over HTTP on this port (0 = off; docs/METRICS.md)"
    )
    metrics_host: str | None = Field(
        None, description="address the metrics endpoint listens on (default: VFL_HOST); plain HTTP, no auth"
    )

    # This service's identity: the name of its files in VFL_TLS_DIR.
    TLS_IDENTITY: ClassVar[str] = ""
    _tls: TlsConfig | None = PrivateAttr(None)

    @field_validator("tls_dir", "tls_ca", "tls_cert", "tls_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("metrics_host", mode="before")
    @classmethod
    def _blank_metrics_host(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _metrics_port_not_the_service_port(self) -> ServiceSettings:
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"VFL_METRICS_PORT: {self.metrics_port} is also VFL_PORT; expected another port")
        return self

    @property
    def metrics_address(self) -> tuple[str, int]:
        """(host, port) of the metrics endpoint; port 0 is off."""
        return self.metrics_host or self.host, self.metrics_port

    @property
    def tls(self) -> TlsConfig | None:
        """The checked TLS material (set by load_settings), or None with VFL_INSECURE=true."""
        return self._tls

    def tls_files(self) -> TlsFiles | None:
        """The TLS files from VFL_TLS_DIR and/or VFL_TLS_CA/CERT/KEY; raises
        TlsError naming the variable when they are incomplete."""
        explicit = {"VFL_TLS_CA": self.tls_ca, "VFL_TLS_CERT": self.tls_cert, "VFL_TLS_KEY": self.tls_key}
        if self.tls_dir is None and not any(explicit.values()):
            return None
        if self.tls_dir is not None:
            base = TlsFiles.in_dir(self.tls_dir, self.TLS_IDENTITY)
            return TlsFiles(self.tls_ca or base.ca, self.tls_cert or base.cert, self.tls_key or base.key)
        missing = [name for name, value in explicit.items() if value is None]
        if missing:
            raise TlsError(f"{missing[0]}: not set (give VFL_TLS_CA, VFL_TLS_CERT and VFL_TLS_KEY, or VFL_TLS_DIR)")
        assert self.tls_ca and self.tls_cert and self.tls_key
        return TlsFiles(self.tls_ca, self.tls_cert, self.tls_key)

    def load_tls(self) -> None:
        """Check the transport options and load the TLS material; raises
        TlsError with a message that starts with the variable's name."""
        files = self.tls_files()
        if self.insecure:
            if files is not None:
                raise TlsError("VFL_INSECURE: true together with TLS files (VFL_TLS_*); set one or the other")
            return
        if files is None:
            raise TlsError(
                "VFL_TLS_DIR: not set: give the TLS files (VFL_TLS_DIR, or VFL_TLS_CA, VFL_TLS_CERT and "
                "VFL_TLS_KEY) or set VFL_INSECURE=true to run in plaintext (local tests only)"
            )
        try:
            self._tls = TlsConfig.load(files)
        except TlsError as exc:
            explicit = {self.tls_ca: "VFL_TLS_CA", self.tls_cert: "VFL_TLS_CERT", self.tls_key: "VFL_TLS_KEY"}
            var = explicit.get(exc.path, "VFL_TLS_DIR") if exc.path is not None else "VFL_TLS_DIR"
            raise TlsError(f"{var}: {exc}", exc.path) from None


_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,512}$")


def read_relay_token(token: str | None, token_file: Path | None) -> str | None:
    """The relay token from VFL_RELAY_TOKEN or VFL_RELAY_TOKEN_FILE (one of
    them), checked: 16 to 512 characters of [A-Za-z0-9._~+/=-], as `vfl
    certs` writes to relay.token. Raises TlsError naming the variable."""
    if token and token_file:
        raise TlsError("VFL_RELAY_TOKEN: set it or VFL_RELAY_TOKEN_FILE, not both")
    var = "VFL_RELAY_TOKEN"
    if token_file:
        var = "VFL_RELAY_TOKEN_FILE"
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise TlsError(f"{var}: {token_file}: {exc.strerror or exc}", token_file) from None
    if not token:
        return None
    if not _TOKEN.match(token):
        raise TlsError(f"{var}: expected 16 to 512 characters of A-Z a-z 0-9 . _ ~ + / = - (see `vfl certs`)")
    return token


class PartySettings(ServiceSettings):
    data_csv: Path = Field(
        ..., description="this party's table, CSV or Parquet (.parquet): an id column and numeric features"
    )
    id_column: str = Field("id", min_length=1, description="name of the id column")
    key_bits: int = Field(2048, ge=128, le=8192, description="modulus size of this party's key in bits")
    test_mode: bool = Field(False, description="allow keys under 2048 bits (tests only)")
    test_initial_weights_seed: int | None = Field(
        None,
        ge=0,
        description="tests only (needs VFL_TEST_MODE): draw this party's initial weights from this seed and the "
        "job id, so that two runs of a job can be compared bit for bit; this party's own setting, never the peer's",
    )

    @model_validator(mode="after")
    def _test_seed_needs_test_mode(self) -> PartySettings:
        if self.test_initial_weights_seed is not None and not self.test_mode:
            raise ValueError("test_initial_weights_seed: only with VFL_TEST_MODE=true (tests only)")
        return self

    backend: str = Field(
        DEFAULT_BACKEND, description="crypto backend: ou (default), paillier (both gmpy2), phe (reference)"
    )
    crypto_workers: int = Field(
        0,
        ge=0,
        le=256,
        description="VFL_COMPUTE=local: processes for large X^T [[v]] products (0 = one per core, 1 = in-process)",
    )
    compute: Literal["local", "ray"] = Field(
        "local",
        description="where this party's large crypto operations run: local (this process and its pool) or ray "
        "(this party's own Ray cluster; pip install 'vfl[ray]')",
    )
    ray_address: str = Field(
        "",
        max_length=512,
        description="VFL_COMPUTE=ray: address of this party's Ray cluster (host:port of its head, or auto); "
        "empty starts a Ray instance on this machine",
    )
    ray_workers: int = Field(
        0, ge=0, le=4096, description="VFL_COMPUTE=ray: crypto worker actors (0 = one per CPU of the cluster)"
    )
    ray_min_block: int = Field(
        256,
        ge=1,
        le=1 << 20,
        description="VFL_COMPUTE=ray: operations on fewer values (products on fewer than 16 x this many terms) "
        "stay in this process; a Ray task costs about a millisecond",
    )
    feature_dtype: Literal["float64", "float32"] = Field(
        "float64", description="how this party holds its features in memory (float32 halves it)"
    )

    @model_validator(mode="after")
    def _ray_options_need_ray(self) -> PartySettings:
        if self.compute != "ray" and (self.ray_address or self.ray_workers):
            raise ValueError("VFL_RAY_ADDRESS, VFL_RAY_WORKERS: only with VFL_COMPUTE=ray")
        return self

    dp_clip_norm: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="differential privacy: L2 norm to which this party clips each standardised feature row "
        "(0 = sqrt of its feature count); stated to the peer, which calibrates its noise to it",
    )


def _blank_is_unset(value: Any) -> Any:
    return None if value == "" else value


def _identities(value: str) -> str:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ValueError("expected a comma-separated list of at least one identity")
    for n in names:
        check_identity(n)
    return ",".join(names)


class PassiveSettings(PartySettings):
    TLS_IDENTITY: ClassVar[str] = "passive"
    allowed_peers: str = Field(
        "active",
        description="identities (comma-separated) allowed to call PartyService, with TLS (the assistant only "
        "tunnels A's connection: it is never a caller)",
    )

    _check_peers = field_validator("allowed_peers")(_identities)

    # B's own policy: what it keeps and serves, whatever A's request says.
    min_learning_rate: float = Field(
        1e-4, ge=0, description="refuse jobs whose learning rate is below this (a model must move from w0)"
    )
    min_iterations: int = Field(
        10, ge=1, description="refuse jobs with fewer iterations; store no model from a job that ran fewer"
    )
    allow_small_batch: bool = Field(
        False, description="consent to A's allow_small_batch (floor 2 * max(p_A + 2, p_B + 1))"
    )
    max_models_per_peer: int = Field(
        0, ge=0, description="models kept per peer identity (0 = p_B // 4: well below the rank that gives X_B)"
    )
    max_predict_ids_per_model: int = Field(1_000_000, ge=1, description="ids scored per model over its lifetime")
    predict_ids_per_window: int = Field(1_000_000, ge=1, description="ids scored per peer identity per window")
    predict_window_s: float = Field(86_400.0, gt=0, description="the window of VFL_PREDICT_IDS_PER_WINDOW, seconds")
    predict_scope: Literal["population", "any"] = Field(
        "population", description="score only the model's training and holdout ids (population), or any id"
    )
    dp_share_clip: float = Field(
        2.0, gt=0, le=1e6, description="differential privacy: bound on |b_i| = |u_B,i| / 4 (B's noise on z_A)"
    )
    max_dp_epsilon: float = Field(
        0.0, ge=0, description="require differential privacy with at most this epsilon (0 = not required)"
    )
    max_alignment_size: int = Field(
        10_000_000,
        ge=1,
        description="ids a peer may submit to one private set intersection (each is a membership test)",
    )
    max_open_alignments: int = Field(2, ge=1, description="private set intersections a peer may run at once")


class ActiveSettings(PartySettings):
    TLS_IDENTITY: ClassVar[str] = "active"
    label_column: str = Field("y", min_length=1, description="name of the 0/1 label column")
    peer_address: str | None = Field(
        None, description="host:port of the passive party (also when going through the assistant)"
    )
    peers: str | None = Field(
        None,
        description="several passive parties instead of VFL_PEER_ADDRESS: name=host:port,name=host:port,...; "
        "each one's certificate must carry its name",
    )
    peer_timeout_s: float = Field(120.0, gt=0, description="deadline of each call to the peer, seconds")
    peer_tls_name: str | None = Field(
        None, description="name the passive party's certificate must carry (default: the host of VFL_PEER_ADDRESS)"
    )
    assistant_address: str | None = Field(
        None, description="host:port of the assistant: tunnel the connection to the passive party through it"
    )
    relay_token: str | None = Field(None, description="the assistant's relay token (with VFL_ASSISTANT_ADDRESS)")
    relay_token_file: Path | None = Field(None, description="file holding the relay token (instead of VFL_RELAY_TOKEN)")
    allowed_clients: str = Field(
        "client", description="identities (comma-separated) allowed to call TrainingService, with TLS"
    )

    _check_clients = field_validator("allowed_clients")(_identities)
    _blank_relay = field_validator(
        "assistant_address", "relay_token", "relay_token_file", "peer_address", "peers", "peer_tls_name", mode="before"
    )(_blank_is_unset)

    @field_validator("peers")
    @classmethod
    def _check_peers(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parse_peers(value)
        return value

    @model_validator(mode="after")
    def _one_way_to_the_passive_parties(self) -> ActiveSettings:
        if self.peers is None and self.peer_address is None:
            raise ValueError("VFL_PEER_ADDRESS: not set (or VFL_PEERS for several passive parties)")
        if self.peers is not None:
            if self.peer_address is not None:
                raise ValueError("VFL_PEERS: set it or VFL_PEER_ADDRESS, not both")
            if self.peer_tls_name is not None:
                raise ValueError("VFL_PEER_TLS_NAME: not used with VFL_PEERS (each party certificate carries its name)")
            if self.assistant_address is not None:
                raise ValueError(
                    "VFL_ASSISTANT_ADDRESS: not served with VFL_PEERS yet (the assistant tunnels to one passive party)"
                )
        return self

    def passive_parties(self) -> dict[str, str]:
        """Name -> address of each passive party (VFL_PEERS), empty with one."""
        return parse_peers(self.peers) if self.peers is not None else {}

    def relay_token_value(self) -> str | None:
        return read_relay_token(self.relay_token, self.relay_token_file)

    def load_tls(self) -> None:
        """Also: the relay token, required with VFL_ASSISTANT_ADDRESS."""
        super().load_tls()
        token = self.relay_token_value()
        if self.assistant_address is not None and token is None:
            raise TlsError(
                "VFL_RELAY_TOKEN: not set: the assistant (VFL_ASSISTANT_ADDRESS) admits only clients with the "
                "federation's relay token (VFL_RELAY_TOKEN or VFL_RELAY_TOKEN_FILE, e.g. relay.token of `vfl certs`)"
            )


def parse_peers(value: str) -> dict[str, str]:
    """VFL_PEERS: `name=host:port` entries, comma-separated, two or more."""
    out: dict[str, str] = {}
    for entry in (e.strip() for e in value.split(",")):
        name, sep, address = entry.partition("=")
        name, address = name.strip(), address.strip()
        if not sep or not name or not address or ":" not in address:
            raise ValueError(f"expected name=host:port entries separated by commas, got {entry!r}")
        check_identity(name)
        if name == "active":
            raise ValueError("'active' is A's own name; give the passive parties other names")
        if name in out:
            raise ValueError(f"passive party {name!r} given twice")
        out[name] = address
    if len(out) < 2:
        raise ValueError("expected two or more passive parties (for one, set VFL_PEER_ADDRESS)")
    return out


class AssistantSettings(ServiceSettings):
    """C is an HTTP CONNECT tunnel: it uses no TLS material (VFL_TLS_* and
    VFL_INSECURE are ignored) and authenticates A by the relay token."""

    TLS_IDENTITY: ClassVar[str] = "assistant"
    upstream_address: str = Field(..., description="host:port of the passive party: the only target C tunnels to")
    relay_token: str | None = Field(None, description="the secret A must present (Proxy-Authorization: Bearer)")
    relay_token_file: Path | None = Field(None, description="file holding the relay token (instead of VFL_RELAY_TOKEN)")
    connect_timeout_s: float = Field(
        10.0, gt=0, description="deadline for a client's CONNECT request and for reaching the upstream, seconds"
    )
    idle_timeout_s: float = Field(300.0, gt=0, description="close a tunnel after this long without a byte, seconds")
    max_tunnels: int = Field(32, ge=1, le=4096, description="tunnels open at once (further CONNECTs get 503)")

    @field_validator("upstream_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r}: expected host:port")
        return value

    _blank_relay = field_validator("relay_token", "relay_token_file", mode="before")(_blank_is_unset)

    def relay_token_value(self) -> str | None:
        return read_relay_token(self.relay_token, self.relay_token_file)

    def load_tls(self) -> None:
        """No TLS for C (the A-B session is TLS end to end through the
        tunnel); the relay token is required."""
        self._tls = None
        if self.relay_token_value() is None:
            raise TlsError(
                "VFL_RELAY_TOKEN: not set: the assistant tunnels only for the holder of the federation's relay "
                "token (VFL_RELAY_TOKEN or VFL_RELAY_TOKEN_FILE, e.g. relay.token of `vfl certs`)"
            )


def identities(value: str) -> frozenset[str]:
    """The names of a comma-separated VFL_ALLOWED_* setting."""
    return frozenset(value.split(","))


S = TypeVar("S", bound=ServiceSettings)


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """A bad setting met while starting: one line on stderr, exit code 2."""
    try:
        yield
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def load_settings(cls: type[S]) -> S:
    """Settings from the environment, or exit 2 with one line per bad option
    (a missing or unusable TLS configuration is one of them)."""
    try:
        settings = cls()
    except ValidationError as exc:
        for err in exc.errors():
            if not err["loc"]:  # a check across options: its message names them
                print(f"config error: {err.get('ctx', {}).get('error', err['msg'])}", file=sys.stderr)
                continue
            name = "VFL_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"config error: {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        settings.load_tls()
    except TlsError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings
