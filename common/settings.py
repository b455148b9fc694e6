"""Service configuration from VFL_* environment variables (pydantic-settings).

Validated at start-up: a bad option stops the service with one line that
names it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.crypto.backend import DEFAULT_BACKEND


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


class PartySettings(ServiceSettings):
    data_csv: Path = Field(..., description="this party's CSV: an id column and numeric features")
    id_column: str = Field("id", min_length=1, description="name of the id column")
    key_bits: int = Field(2048, ge=128, le=8192, description="modulus size of this party's key in bits")
    test_mode: bool = Field(False, description="allow keys under 2048 bits (tests only)")
    backend: str = Field(
        DEFAULT_BACKEND, description="crypto backend: ou (default), paillier (both gmpy2), phe (reference)"
    )
    crypto_workers: int = Field(
        0, ge=0, le=256, description="processes for large X^T [[v]] products (0 = one per core, 1 = in-process)"
    )


class PassiveSettings(PartySettings):
    pass


class ActiveSettings(PartySettings):
    label_column: str = Field("y", min_length=1, description="name of the 0/1 label column")
    peer_address: str = Field(..., description="host:port of the passive party, or of the assistant")
    peer_timeout_s: float = Field(120.0, gt=0, description="deadline of each call to the peer, seconds")


class AssistantSettings(ServiceSettings):
    upstream_address: str = Field(..., description="host:port of the passive party to relay to")
    peer_timeout_s: float = Field(120.0, gt=0, description="deadline of each relayed call, seconds")


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S]) -> S:
    """Settings from the environment, or exit 2 with one line per bad option."""
    try:
        return cls()
    except ValidationError as exc:
        for err in exc.errors():
            name = "VFL_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"config error: {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
