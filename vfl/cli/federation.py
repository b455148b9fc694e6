"""Start the three services as local processes on free ports (used by
`vfl demo` and by the end-to-end tests): each party in its own process with
its own data directory, talking real gRPC over loopback, with mutual TLS
(certificates created once in workdir/certs) unless tls=False. With the
assistant, A's channel to B is a CONNECT tunnel through it, authenticated
to it by the relay token in workdir/relay.token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from vfl.common.tls import CLIENT_IDENTITY, TlsFiles, create_certs, create_relay_token


class ServiceStartError(RuntimeError):
    """A service exited before serving. `reason` is its own one-line
    "config error: ..." when it gave one (bad settings, CSV, port, key)."""

    def __init__(self, name: str, returncode: int, log_path: Path) -> None:
        tail = log_path.read_text(errors="replace")[-4000:]
        reasons = [line for line in tail.splitlines() if line.startswith("config error: ")]
        self.name, self.returncode, self.log_path = name, returncode, log_path
        self.reason = reasons[-1] if reasons else f"exited with code {returncode}"
        super().__init__(f"{name} exited with code {returncode} before serving:\n{tail[-2000:]}")


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_service(
    name: str, module: str, env: dict[str, str], workdir: Path, timeout_s: float = 60.0
) -> ServiceProcess:
    """Start `python -m module` and wait until it has written its port file."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    full_env = {**os.environ, **env, "VFL_PORT_FILE": str(port_file), "PYTHONUNBUFFERED": "1"}
    full_env.setdefault("VFL_PORT", "0")
    root = Path(__file__).resolve().parents[2]
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), full_env.get("PYTHONPATH", "")]))
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", module], env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=root
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return ServiceProcess(name, proc, int(port_file.read_text()), log_path, env)
        if proc.poll() is not None:
            raise ServiceStartError(name, proc.returncode, log_path)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{name} did not start within {timeout_s:.0f} s; log: {log_path}")


@dataclass
class LocalFederation:
    """Passive party, optional assistant, active party; stopped on exit."""

    workdir: Path
    active_csv: Path
    passive_csv: Path
    key_bits: int = 2048
    assistant: bool = True
    label_column: str = "y"
    id_column: str = "id"
    extra_env: dict[str, str] = field(default_factory=dict)
    transcripts: bool = False
    tls: bool = True
    # Tests only: run a service under a planted regression (tests/attacks/planted.py),
    # e.g. {"passive": "seeded-initial-weights"}.
    plants: dict[str, str] = field(default_factory=dict)
    # Several passive parties (name -> CSV, e.g. {"b1": ..., "b2": ...}):
    # each its own service with its own certificate; A is given them as
    # VFL_PEERS and `passive_csv` is unused. No assistant (it tunnels to one).
    passive_parties: dict[str, Path] = field(default_factory=dict)
    # More environment for one service only (name -> VFL_* values), after extra_env,
    # e.g. {"passive": {"VFL_COMPUTE": "ray"}}.
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The services run in the repository root: paths given relative to the
        # caller's directory must mean what the caller meant.
        self.workdir = Path(self.workdir).resolve()
        self.active_csv = Path(self.active_csv).resolve()
        self.passive_csv = Path(self.passive_csv).resolve()
        self.passive_parties = {n: Path(p).resolve() for n, p in self.passive_parties.items()}
        if self.passive_parties and self.assistant:
            raise ValueError("assistant: not with several passive parties (the assistant tunnels to one)")

    @property
    def passive_names(self) -> list[str]:
        """The passive services' names: "passive", or each party's own."""
        return sorted(self.passive_parties) or ["passive"]

    @property
    def certs_dir(self) -> Path:
        return self.workdir / "certs"

    def tls_files(self, name: str = CLIENT_IDENTITY) -> TlsFiles | None:
        """An identity's TLS files (created on first use); None without TLS."""
        if not self.tls:
            return None
        create_certs(self.certs_dir, [name], services=self.passive_parties)
        return TlsFiles.in_dir(self.certs_dir, name)

    @property
    def relay_token_file(self) -> Path:
        """The federation's relay token (A presents it to C), created on first use."""
        return create_relay_token(self.workdir / "relay.token")

    def _tls_env(self, name: str) -> dict[str, str]:
        # Explicit files (and VFL_TLS_DIR blanked) so that VFL_TLS_* or VFL_INSECURE
        # in the caller's environment cannot change what the services use.
        files = self.tls_files(name)
        if files is None:
            return {"VFL_INSECURE": "true", "VFL_TLS_DIR": "", "VFL_TLS_CA": "", "VFL_TLS_CERT": "", "VFL_TLS_KEY": ""}
        env = {"VFL_INSECURE": "false", "VFL_TLS_DIR": ""}
        env.update(VFL_TLS_CA=str(files.ca), VFL_TLS_CERT=str(files.cert), VFL_TLS_KEY=str(files.key))
        return env

    def _env(self, name: str, **more: str) -> dict[str, str]:
        if name == "assistant":
            # C uses no TLS material: it gets none.
            tls_env = {"VFL_TLS_DIR": "", "VFL_TLS_CA": "", "VFL_TLS_CERT": "", "VFL_TLS_KEY": ""}
        else:
            tls_env = self._tls_env(name)
        env = {
            "VFL_DATA_DIR": str(self.workdir / name / "data"),
            "VFL_KEY_BITS": str(self.key_bits),
            "VFL_TEST_MODE": "true" if self.key_bits < 2048 else "false",
            "VFL_ID_COLUMN": self.id_column,
            **tls_env,
            **self.extra_env,
            **more,
            **self.service_env.get(name, {}),
        }
        if self.transcripts:
            env["VFL_TRANSCRIPT_PATH"] = str(self.workdir / f"{name}.transcript.jsonl")
        return env

    def start(self, name: str) -> ServiceProcess:
        """(Re)start one service with its usual environment."""
        if name == "passive" or name in self.passive_parties:
            csv_path = self.passive_parties.get(name, self.passive_csv)
            env = self._env(name, VFL_DATA_CSV=str(csv_path))
            module = "vfl.services.passive"
        elif name == "assistant":
            # A tunnel to B and nothing else; C gets no certificate (it uses none).
            env = self._env(
                "assistant",
                VFL_UPSTREAM_ADDRESS=self.services["passive"].address,
                VFL_RELAY_TOKEN_FILE=str(self.relay_token_file),
                VFL_RELAY_TOKEN="",
            )
            module = "vfl.services.assistant"
        else:
            # Always B's address and B's name (127.0.0.1 alone is in every certificate):
            # through the assistant, TLS is still end to end with B.
            via = {}
            if self.assistant:
                via = {
                    "VFL_ASSISTANT_ADDRESS": self.services["assistant"].address,
                    "VFL_RELAY_TOKEN_FILE": str(self.relay_token_file),
                    "VFL_RELAY_TOKEN": "",
                }
            if self.passive_parties:
                peers = ",".join(f"{n}={self.services[n].address}" for n in self.passive_names)
                to_passive = {"VFL_PEERS": peers, "VFL_PEER_ADDRESS": "", "VFL_PEER_TLS_NAME": ""}
            else:
                to_passive = {
                    "VFL_PEER_ADDRESS": self.services["passive"].address,
                    "VFL_PEER_TLS_NAME": "passive",
                    "VFL_PEERS": "",
                }
            env = self._env(
                "active",
                VFL_DATA_CSV=str(self.active_csv),
                VFL_LABEL_COLUMN=self.label_column,
                **to_passive,
                **{**via, **{k: v for k, v in self.extra_env.items() if k in via}},
            )
            module = "vfl.services.active"
        if name in self.plants:
            env.update(VFL_PLANT=self.plants[name], VFL_PLANT_MODULE=module)
            module = "tests.attacks.planted"
        old = self.services.get(name)
        if old is not None:
            env["VFL_PORT"] = str(old.port)  # keep the address others were given
        svc = start_service(name, module, env, self.workdir)
        self.services[name] = svc
        return svc

    def __enter__(self) -> LocalFederation:
        try:
            for name in self.passive_names:
                self.start(name)
            if self.assistant:
                self.start("assistant")
            self.start("active")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def active_address(self) -> str:
        return self.services["active"].address

    def stop(self) -> None:
        for name in ("active", "assistant", *self.passive_names):
            if name in self.services:
                self.services[name].stop()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()
