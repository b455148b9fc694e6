"""The federation across network namespaces: A, C and B each in its own
namespace, joined by veth pairs (A <-> C and C <-> B; the test process
reaches A over a third pair): plain links, links with `tc netem` delay 20 ms
and loss 1 %, and 1 Mbit/s `tc tbf` links (which kernels without netem also
have). Each service listens on its namespace's address
(VFL_HOST) and runs with the environment LocalFederation gives it
(plaintext, test-size keys).

The job trained there must give the model of the same job run on loopback:
the masks cancel exactly and every other step is deterministic (both runs
draw initial weights from each party's own test-mode seed, SAME_START), so
the weights agree to 1e-9 relative whatever the network did.

Needs root, `ip` and `tc`, and a kernel that lets it create namespaces;
otherwise skipped with the reason. The netem and tbf cases also need the
kernel's sch_netem and sch_tbf (skipped without). `make test-system` runs it; namespaces, links and processes are
removed whatever happens.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import vfl.cli.federation
from tests.conftest import SAME_START, BreastSplit, make_federation, read_shard
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation, ServiceProcess
from vfl.common.jobconfig import job_config
from vfl.v1 import client_pb2

# On the federation's links (A-C, C-B), both directions. netem is the impairment
# asked for; tbf (a 1 Mbit/s link that drops what waits over 400 ms) also runs
# on kernels built without sch_netem.
IMPAIRMENTS = {
    "plain": None,
    "netem": "netem delay 20ms loss 1%",
    "tbf": "tbf rate 1mbit burst 32kbit latency 400ms",
}
PORT = 50051
TAG = f"{os.getpid() % 100_000}"
# One /24 per link: the test process <-> A, A <-> C, C <-> B. Only the first
# has an end in this (the root) namespace: its subnet varies with the pid, so
# that two runs at once do not clash.
CLIENT_NET = f"10.202.{os.getpid() % 250}"
LINKS = {
    "client": ("vflh" + TAG, "vfla" + TAG, None, "active", f"{CLIENT_NET}.1", f"{CLIENT_NET}.2"),
    "a-c": ("vflac" + TAG, "vflca" + TAG, "active", "assistant", "10.201.1.1", "10.201.1.2"),
    "c-b": ("vflcb" + TAG, "vflbc" + TAG, "assistant", "passive", "10.201.2.1", "10.201.2.2"),
}
# Each service listens on the address its caller reaches it at.
HOSTS = {"active": f"{CLIENT_NET}.2", "assistant": "10.201.1.2", "passive": "10.201.2.2"}
NAMESPACES = {name: f"vfl-{party}-{TAG}" for name, party in (("active", "a"), ("assistant", "c"), ("passive", "b"))}


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def must(*cmd: str) -> None:
    out = run(*cmd)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or out.returncode}")


def why_not_here() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (creates network namespaces)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (iproute2) on the PATH"
    probe = f"vfl-probe-{TAG}"
    out = run("ip", "netns", "add", probe)
    if out.returncode:
        return f"cannot create a network namespace here: {out.stderr.strip()}"
    run("ip", "netns", "del", probe)
    return None


@pytest.fixture(scope="module", autouse=True)
def namespaces_allowed() -> None:
    reason = why_not_here()
    if reason:
        pytest.skip(reason)


def qdisc_missing(qdisc: str) -> str | None:
    """Why `tc qdisc add ... <qdisc>` is refused here, or None (tried on a throwaway namespace's lo)."""
    probe = f"vfl-qdisc-{TAG}"
    must("ip", "netns", "add", probe)
    try:
        out = run("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", *qdisc.split())
        kind = qdisc.split()[0]
        return (
            None if out.returncode == 0 else f"tc {kind} refused: {out.stderr.strip()} (no sch_{kind} in this kernel?)"
        )
    finally:
        run("ip", "netns", "del", probe)


def build_network(qdisc: str | None) -> None:
    for ns in NAMESPACES.values():
        must("ip", "netns", "add", ns)
        must("ip", "-n", ns, "link", "set", "lo", "up")
    for left, right, left_ns, right_ns, left_ip, right_ip in LINKS.values():
        must("ip", "link", "add", left, "type", "veth", "peer", "name", right)
        for dev, party, ip in ((left, left_ns, left_ip), (right, right_ns, right_ip)):
            where: list[str] = []
            if party is not None:
                must("ip", "link", "set", dev, "netns", NAMESPACES[party])
                where = ["-n", NAMESPACES[party]]
            must("ip", *where, "addr", "add", f"{ip}/24", "dev", dev)
            must("ip", *where, "link", "set", dev, "up")
            if qdisc and left_ns is not None:  # the federation's links (A-C, C-B), both directions
                ns = NAMESPACES[str(party)]
                must("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *qdisc.split())


def tear_down_network() -> None:
    """Deleting a namespace deletes the veth ends in it, and so the pairs."""
    for ns in NAMESPACES.values():
        run("ip", "netns", "del", ns)
    run("ip", "link", "del", LINKS["client"][0])  # if A's namespace was never made


@dataclass
class NetnsService(ServiceProcess):
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def start_in_namespace(
    name: str, module: str, env: dict[str, str], workdir: Path, timeout_s: float = 60.0
) -> ServiceProcess:
    """vfl.cli.federation.start_service, but inside the party's namespace and
    listening on its address."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    root = Path(vfl.cli.federation.__file__).resolve().parents[2]
    full_env = {
        **os.environ,
        **env,
        "VFL_HOST": HOSTS[name],
        "VFL_PORT": env.get("VFL_PORT", str(PORT)),
        "VFL_PORT_FILE": str(port_file),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")])),
    }
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", NAMESPACES[name], sys.executable, "-m", module],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return NetnsService(name, proc, int(port_file.read_text()), log_path, env, HOSTS[name])
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {proc.returncode}:\n{log_path.read_text(errors='replace')[-2000:]}"
            )
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{name} did not start within {timeout_s:.0f} s; log: {log_path}")


class NetnsFederation(LocalFederation):
    """LocalFederation's services and environment, each in its namespace."""

    def start(self, name: str) -> ServiceProcess:
        with mock.patch.object(vfl.cli.federation, "start_service", start_in_namespace):
            return super().start(name)


def train_and_read(fed: LocalFederation, breast: BreastSplit, timeout_s: float) -> dict[str, np.ndarray]:
    """The small job (breast, 1 epoch) trained to its end; its weights and scores."""
    with VflClient(fed.active_address, timeout_s=timeout_s) as client:
        client.wait_ready(60)
        client.start_training(job_config(epochs=1, batch_size=64), breast.train_ids, job_id="netns-job")
        final = client.wait("netns-job")
        assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
        probs = client.predict("netns-job", breast.test_ids)
    shard = {p: read_shard(fed, p, "netns-job") for p in ("active", "passive")}
    return {
        "w_active": np.asarray(shard["active"]["weights"] + [shard["active"]["intercept"]]),
        "w_passive": np.asarray(shard["passive"]["weights"]),
        "probabilities": probs,
    }


@pytest.fixture(scope="module")
def loopback_model(tmp_path_factory: pytest.TempPathFactory, breast: BreastSplit) -> dict[str, np.ndarray]:
    with make_federation(tmp_path_factory.mktemp("loopback"), extra_env=SAME_START) as fed:
        return train_and_read(fed, breast, timeout_s=120)


@pytest.fixture(params=list(IMPAIRMENTS))
def network(request: pytest.FixtureRequest) -> Iterator[str]:
    qdisc = IMPAIRMENTS[request.param]
    if qdisc and (missing := qdisc_missing(qdisc)):
        pytest.skip(missing)
    try:
        build_network(qdisc)
        yield request.param
    finally:
        tear_down_network()


def test_namespaces_give_the_loopback_model(
    network: str, loopback_model: dict[str, np.ndarray], breast: BreastSplit, tmp_path: Path
) -> None:
    # The options of the loopback run (make_federation: test-size keys, plaintext), in namespaces.
    base = make_federation(tmp_path, extra_env=SAME_START)
    fed = NetnsFederation(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init})
    try:
        with fed:
            for name, svc in fed.services.items():
                assert svc.address == f"{HOSTS[name]}:{PORT}", svc.address
                where = run("ip", "netns", "identify", str(svc.proc.pid)).stdout.strip()
                assert where == NAMESPACES[name], f"{name} runs in namespace {where!r}"
            t0 = time.perf_counter()
            model = train_and_read(fed, breast, timeout_s=300)
            seconds = time.perf_counter() - t0
    finally:
        fed.stop()
    for key, want in loopback_model.items():
        np.testing.assert_allclose(model[key], want, rtol=1e-9, atol=0, err_msg=f"{key} over {network} namespaces")
    worst = max(float(np.max(np.abs(model[k] - w) / np.maximum(np.abs(w), 1e-300))) for k, w in loopback_model.items())
    print(
        f"\n[netns] {network}: trained and scored in {seconds:.1f} s; "
        f"largest relative difference to the loopback model {worst:.1e}"
    )
