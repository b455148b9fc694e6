"""The federation through a faulty network: a FaultProxy (tests/faultproxy.py)
on A -> C and on C -> B, injecting latency and jitter, a bandwidth cap,
connection resets (RST), stalls and truncated writes. This kernel has no
netem; the proxy needs no root and no namespaces, so this runs anywhere.

Real services, each its own process, real gRPC, mutual TLS end to end
through C's tunnel (so a truncation cuts a TLS record). Each party draws its
initial weights from its test-mode seed and the job id (SAME_START), so the
same job run on a clean loopback federation (the reference) gives the model a
faulty run must give: the masks cancel exactly and every retry is answered
by replay, so whatever the network did, the weights agree to 1e-9 relative,
and so do the predictions.

- test_each_fault_gives_the_clean_model: the breast job (1 epoch, batch 64)
  under each fault in turn.
- test_a_lost_reply_still_gives_the_clean_model, test_a_set_up_job_a_could_not_
  release_is_answered_again: B's answer to SetupJob or FinishJob lost after B
  acted on it (the tunnel reset the moment B logs it), and A's abort lost too.
- test_random_faults: JOBS short jobs under seeded random mixes of faults
  (different per link and direction); counts wrong models, hangs (not terminal
  by the job's deadline) and failures, which must each carry a clear reason
  (a message, not "internal error"), and no service may log an internal
  error. Prints `[faults]` lines: the counts, the retried calls, what the
  proxies injected and the jobs left set up at B.

The client retries StartTraining and Predict on UNAVAILABLE (A retries the
training steps itself, not those two). `make test-system` runs this file too;
it needs no root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import SAME_START, BreastSplit, make_federation, read_shard, tls_client
from tests.faultproxy import FaultProxy, Faults, FaultyFederation
from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.common.jobconfig import JobConfig, job_config
from vfl.v1 import client_pb2

# One of each kind, on both links and both directions. Strong enough that each
# fires several times in one epoch (asserted), short enough (stalls of 1 s)
# that no call comes near its deadline or A's recovery limit (120 s).
EACH_FAULT = {
    "latency": Faults(latency_s=0.02, jitter_s=0.015, seed=11),
    "bandwidth": Faults(bytes_per_s=64_000, seed=12),
    "resets": Faults(reset_p=0.03, reset_conn_p=0.3, reset_within_s=1.0, seed=13),
    "stalls": Faults(stall_p=0.05, stall_s=1.0, seed=14),
    "truncations": Faults(truncate_p=0.03, seed=15),
}
# The ProxyStats counter that shows each fault did happen.
FIRED = {"resets": "resets", "stalls": "stalls", "truncations": "truncations"}
BREAST_JOB = job_config(epochs=1, batch_size=64)

JOBS = 100
MIX_SEED = 2026
SHORT_JOB = job_config(max_iterations=3, batch_size=64)  # B's floor is relaxed to 1 (RELAXED_POLICY)
DEADLINE_S = 120.0  # per job: not terminal by then is a hang
# A retries the training steps itself; StartTraining and Predict fail on a lost
# connection (UNAVAILABLE, with the hop), and the client retries them, as a real one would.
START_TRIES = 3
PREDICT_TRIES = 10
# Under one strong fault (resets at 3 % of chunks, 30 % of connections) a set-up
# can be cut several times in a row; what these cases check is the model.
EACH_FAULT_START_TRIES = 10
RTOL = 1e-9


@dataclass
class Model:
    w_active: np.ndarray
    w_passive: np.ndarray

    def differs(self, other: Model) -> str | None:
        """None if the weights agree to RTOL, else what differs."""
        for name in ("w_active", "w_passive"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine.shape != theirs.shape or not np.allclose(mine, theirs, rtol=RTOL, atol=0):
                return f"{name}: {mine} != {theirs}"
        return None


def read_model(fed: LocalFederation, job_id: str) -> Model:
    shard = {p: read_shard(fed, p, job_id) for p in ("active", "passive")}
    return Model(
        np.asarray(shard["active"]["weights"] + [shard["active"]["intercept"]]),
        np.asarray(shard["passive"]["weights"]),
    )


def wait_terminal(client: VflClient, job_id: str, deadline: float) -> client_pb2.JobStatus:
    """The job's status once it ended, or at the deadline (then still running)."""
    try:
        for _ in client.stub.WatchJob(
            client_pb2.WatchJobRequest(job_id=job_id), timeout=max(1.0, deadline - time.monotonic())
        ):
            pass
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return client.status(job_id)


def start(
    client: VflClient, config: JobConfig, ids: list[str], job_id: str, tries: int = START_TRIES, alignment_id: str = ""
) -> tuple[bool, list[str]]:
    """An alignment (A retries it inside while B cannot be reached), then
    StartTraining on it, tried again on UNAVAILABLE with the same job id and
    alignment, as a client repeats its request: (started, errors of failed tries)."""
    errors: list[str] = []
    for _ in range(tries):
        try:
            if not alignment_id:
                aligned = client.align()
                if aligned.state != client_pb2.ALIGNMENT_STATE_SUCCEEDED:
                    errors.append(f"StartAlignment FAILED: {aligned.error}")
                    continue
                alignment_id = aligned.alignment_id
            client.start_training(config, ids, job_id=job_id, alignment_id=alignment_id)
            return True, errors
        except grpc.RpcError as exc:
            errors.append(f"StartTraining {exc.code().name}: {exc.details()}")
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                break
            time.sleep(0.5)
    return False, errors


def predict(client: VflClient, job_id: str, ids: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """Scores (None if every try failed) and the errors of the failed tries."""
    errors: list[str] = []
    for _ in range(PREDICT_TRIES):
        try:
            return client.predict(job_id, ids), errors
        except grpc.RpcError as exc:
            errors.append(f"Predict {exc.code().name}: {exc.details()}")
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                break
            # A's channel to B waits out its reconnect backoff after a reset;
            # a try inside it fails at once (seen in CI on a loaded machine).
            time.sleep(0.25 * len(errors))
    return None, errors


def clear(reason: str) -> bool:
    """A failure's message says what went wrong (not an opaque internal error)."""
    text = reason.split(": ", 1)[-1].strip() if reason.startswith(("StartTraining", "Predict")) else reason.strip()
    return bool(text) and not text.lower().startswith("internal error")


def kind(reason: str) -> str:
    """A failure's message without its particulars (ids, addresses, numbers), to count kinds."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\S*\d\S*", "#", reason)
    return " ".join(text.split())[:90]


class Reference:
    """A clean loopback federation (plaintext, no proxy); each job's model
    and scores trained there once."""

    def __init__(self, fed: LocalFederation, breast: BreastSplit) -> None:
        self.fed, self.breast = fed, breast
        self.client = VflClient(fed.active_address, timeout_s=120)
        self.client.wait_ready(60)
        self._done: dict[str, tuple[Model, np.ndarray]] = {}

    def __call__(self, job_id: str, config: JobConfig) -> tuple[Model, np.ndarray]:
        if job_id not in self._done:
            self.client.start_training(config, self.breast.train_ids, job_id=job_id)
            final = self.client.wait(job_id)
            assert final.state == client_pb2.JOB_STATE_SUCCEEDED, f"clean run of {job_id}: {final.error}"
            self._done[job_id] = (read_model(self.fed, job_id), self.client.predict(job_id, self.breast.test_ids))
        return self._done[job_id]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, breast: BreastSplit) -> Iterator[Reference]:
    with make_federation(tmp_path_factory.mktemp("clean"), extra_env=SAME_START) as fed:
        ref = Reference(fed, breast)
        yield ref
        ref.client.close()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyFederation]:
    """The federation with a proxy on each link (clean until a test sets faults), mutual TLS."""
    base = make_federation(tmp_path_factory.mktemp("faulty"), extra_env=SAME_START, tls=True)
    fed = FaultyFederation(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init})
    with fed:
        yield fed


@pytest.fixture()
def client(faulty: FaultyFederation) -> Iterator[VflClient]:
    faulty.set_faults(Faults())
    with tls_client(faulty, timeout_s=DEADLINE_S) as c:
        c.wait_ready(60)
        yield c
    faulty.set_faults(Faults())


def test_the_proxies_carry_every_hop(faulty: FaultyFederation, client: VflClient) -> None:
    """A's tunnel really runs through both proxies (and A is called directly)."""
    assert client.list_models() is not None
    assert {"a-c", "c-b"} == set(faulty.proxies)
    for name, link in FaultyFederation.LINKS.items():
        assert faulty.services[name].address == faulty.proxies[link].address
    env = faulty.services["active"].env
    assert env["VFL_ASSISTANT_ADDRESS"] == faulty.proxies["a-c"].address
    assert env["VFL_PEER_ADDRESS"] == faulty.proxies["c-b"].address
    assert faulty.services["assistant"].env["VFL_UPSTREAM_ADDRESS"] == faulty.proxies["c-b"].address


@pytest.mark.parametrize("fault", list(EACH_FAULT))
def test_each_fault_gives_the_clean_model(
    fault: str, faulty: FaultyFederation, client: VflClient, reference: Reference, breast: BreastSplit
) -> None:
    job_id = f"fault-{fault}"
    want_model, want_scores = reference(job_id, BREAST_JOB)
    before = faulty.stats()
    faulty.set_faults(EACH_FAULT[fault])
    t0 = time.perf_counter()
    started, start_errors = start(client, BREAST_JOB, breast.train_ids, job_id, EACH_FAULT_START_TRIES)
    assert started, f"under {fault}, StartTraining failed {EACH_FAULT_START_TRIES}x: {start_errors}"
    assert all(clear(e) for e in start_errors), start_errors
    final = wait_terminal(client, job_id, time.monotonic() + DEADLINE_S)
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, f"under {fault}: {final.error or final}"
    scores, errors = predict(client, job_id, breast.test_ids)
    seconds = time.perf_counter() - t0
    faulty.set_faults(Faults())
    assert scores is not None, f"under {fault}, every Predict failed: {errors}"
    assert all(clear(e) for e in errors), errors

    problem = read_model(faulty, job_id).differs(want_model)
    assert problem is None, f"under {fault}, a model other than the clean one: {problem}"
    np.testing.assert_allclose(scores, want_scores, rtol=RTOL, atol=0, err_msg=f"scores under {fault}")

    fired = {link: after.since(before[link]) for link, after in faulty.stats().items()}
    if fault in FIRED:
        total = sum(getattr(d, FIRED[fault]) for d in fired.values())
        assert total > 0, f"{fault}: the proxies injected none ({fired}); the test proved nothing"
    print(
        f"\n[faults] {fault}: clean model in {seconds:.1f} s; "
        + "; ".join(f"{link} {d.describe()}" for link, d in fired.items())
        + (f"; StartTraining retried {len(start_errors)}x" if start_errors else "")
        + (f"; Predict retried {len(errors)}x" if errors else "")
    )


# --- a reply lost at the edges of a job ---------------------------------------------------
# B's replies on C -> B are held HOLD_S in the proxy; the moment B logs that it
# did the work, every connection through that proxy is reset: the reply is lost
# after B acted on the request, deterministically.

HOLD_S = 0.3


@contextlib.contextmanager
def reset_when_logged(
    fed: LocalFederation, service: str, line: str, proxy: FaultProxy, then: Faults | None = None
) -> Iterator[threading.Event]:
    """Reset every connection through `proxy` as soon as `service` logs `line`
    (first setting its faults to `then`, if given); the event says it did."""
    path = Path(fed.services[service].log_path)
    offset, fired, stop = path.stat().st_size, threading.Event(), threading.Event()

    def watch() -> None:
        seen = b""
        with path.open("rb") as log:
            log.seek(offset)
            while not stop.is_set():
                seen += log.read()
                if line.encode() in seen:
                    if then is not None:
                        proxy.set_faults(then)
                    proxy.reset_all()
                    fired.set()
                    return
                time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield fired
    finally:
        stop.set()
        watcher.join(5)


@pytest.mark.parametrize(
    ("lost", "logged"),
    [("SetupJob", "event=job_setup job={job_id} "), ("FinishJob", "event=model_stored job={job_id} ")],
)
def test_a_lost_reply_still_gives_the_clean_model(
    lost: str, logged: str, faulty: FaultyFederation, client: VflClient, reference: Reference, breast: BreastSplit
) -> None:
    """SetupJob: StartTraining fails (UNAVAILABLE), and B must not keep the job
    it set up, so that the client's second try with the same id runs. FinishJob:
    B stored its shard and ended the job, and A must still complete the job."""
    job_id = f"lost-{lost.lower()}"
    want_model, want_scores = reference(job_id, SHORT_JOB)
    proxy = faulty.proxies["c-b"]
    proxy.set_faults(down=Faults(latency_s=HOLD_S))
    with reset_when_logged(faulty, "passive", logged.format(job_id=job_id), proxy) as fired:
        started, errors = start(client, SHORT_JOB, breast.train_ids, job_id)
        final = wait_terminal(client, job_id, time.monotonic() + DEADLINE_S) if started else None
    proxy.set_faults(Faults())
    assert fired.is_set(), f"B never logged {logged!r}"
    assert started, f"StartTraining after a lost {lost} reply: {errors}"
    assert all(clear(e) for e in errors), errors
    assert final is not None and final.state == client_pb2.JOB_STATE_SUCCEEDED, f"lost {lost} reply: {final}"
    problem = read_model(faulty, job_id).differs(want_model)
    assert problem is None, f"after a lost {lost} reply, a model other than the clean one: {problem}"
    scores, _ = predict(client, job_id, breast.test_ids)
    assert scores is not None
    np.testing.assert_allclose(scores, want_scores, rtol=RTOL, atol=0)
    assert job_id not in _orphans_at_passive(faulty, [job_id])


def test_a_set_up_job_a_could_not_release_is_answered_again(
    faulty: FaultyFederation, client: VflClient, reference: Reference, breast: BreastSplit
) -> None:
    """SetupJob's answer lost, and A's abort too (the link stays down while
    A tries it): B holds the job. The client's second StartTraining with the
    same id repeats the set-up request, and B answers it again instead of
    refusing A its own job (ALREADY_EXISTS)."""
    job_id = "lost-setup-and-abort"
    want_model, _ = reference(job_id, SHORT_JOB)
    proxy = faulty.proxies["c-b"]
    proxy.set_faults(down=Faults(latency_s=HOLD_S))
    down = Faults(reset_conn_p=1.0, reset_within_s=0.0)  # every new connection reset at once
    active_log = Path(faulty.services["active"].log_path)
    aligned = client.align()
    assert aligned.state == client_pb2.ALIGNMENT_STATE_SUCCEEDED, aligned.error
    # The link goes down, for every new connection, the moment B has set the job up.
    with reset_when_logged(faulty, "passive", f"event=job_setup job={job_id} ", proxy, then=down) as fired:
        started, errors = start(client, SHORT_JOB, breast.train_ids, job_id, 1, aligned.alignment_id)
    assert fired.is_set()
    assert not started and "UNAVAILABLE" in errors[0], errors
    deadline = time.monotonic() + 60
    while f"event=abort_not_delivered job={job_id}" not in active_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "A did not give up its abort"
        time.sleep(0.2)
    proxy.set_faults(Faults())
    assert _orphans_at_passive(faulty, [job_id]) == [job_id]  # B holds it
    # Tries enough to outlast A's reconnection backoff (up to 2 s) after the long outage.
    started, errors = start(client, SHORT_JOB, breast.train_ids, job_id, EACH_FAULT_START_TRIES, aligned.alignment_id)
    assert started, errors
    final = wait_terminal(client, job_id, time.monotonic() + DEADLINE_S)
    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
    assert "event=setup_replayed job=" + job_id in Path(faulty.services["passive"].log_path).read_text()
    problem = read_model(faulty, job_id).differs(want_model)
    assert problem is None, problem


# --- random mixes ---------------------------------------------------------------------


def mixed_faults(rng: random.Random, seed: int) -> Faults:
    """Each kind of fault on with probability 1/2, at a moderate level; stalls
    far shorter than any deadline."""

    def on() -> bool:
        return rng.random() < 0.5

    return Faults(
        latency_s=rng.uniform(0.0, 0.005) if on() else 0.0,
        jitter_s=rng.uniform(0.0, 0.003) if on() else 0.0,
        bytes_per_s=rng.choice([256e3, 1e6, 4e6]) if on() else 0.0,
        reset_p=rng.uniform(0.0, 0.02) if on() else 0.0,
        reset_conn_p=rng.uniform(0.0, 0.2) if on() else 0.0,
        reset_within_s=1.0,
        stall_p=rng.uniform(0.0, 0.02) if on() else 0.0,
        stall_s=rng.uniform(0.1, 0.6),
        truncate_p=rng.uniform(0.0, 0.02) if on() else 0.0,
        seed=seed,
    )


@dataclass
class Tally:
    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    unclear: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    predictions: int = 0
    predict_failed: Counter[str] = field(default_factory=Counter)  # failed tries
    start_failed: Counter[str] = field(default_factory=Counter)  # failed tries

    def fail(self, job_id: str, reason: str, counter: Counter[str] | None = None) -> None:
        (self.failed if counter is None else counter)[kind(reason)] += 1
        if not clear(reason):
            self.unclear.append(f"{job_id}: {reason!r}")

    def line(self, seconds: float) -> str:
        reasons = "; ".join(f"{n}x {k}" for k, n in self.failed.most_common()) or "none"
        retried = "".join(
            f"\n[faults] {what} tries that failed (the client tried again): "
            + "; ".join(f"{n}x {k}" for k, n in counter.most_common())
            for what, counter in (("StartTraining", self.start_failed), ("Predict", self.predict_failed))
            if counter
        )
        return (
            f"[faults] {JOBS} jobs: {self.succeeded} succeeded, {sum(self.failed.values())} failed "
            f"(reasons: {reasons}), {len(self.wrong)} wrong, {len(self.hangs)} hangs, {seconds:.0f} s; "
            f"{self.predictions} predictions checked{retried}"
        )


def run_job(client: VflClient, faulty: FaultyFederation, job_id: str, breast: BreastSplit, tally: Tally) -> bool:
    """One short job under the current faults; True if it stored a model."""
    deadline = time.monotonic() + DEADLINE_S
    started, errors = start(client, SHORT_JOB, breast.train_ids, job_id)
    for e in errors[:-1] if not started else errors:
        tally.fail(job_id, e, tally.start_failed)
    if not started:
        if "DEADLINE_EXCEEDED" in errors[-1]:
            tally.hangs.append(f"{job_id}: StartTraining did not answer within {DEADLINE_S:.0f} s")
        else:
            tally.fail(job_id, errors[-1])
        return False
    final = wait_terminal(client, job_id, deadline)
    if final.state == client_pb2.JOB_STATE_RUNNING:
        tally.hangs.append(f"{job_id}: still running at iteration {final.iteration} after {DEADLINE_S:.0f} s")
        return False
    if final.state != client_pb2.JOB_STATE_SUCCEEDED:
        tally.fail(job_id, final.error)
        return False
    tally.succeeded += 1
    return True


def test_random_faults(faulty: FaultyFederation, client: VflClient, reference: Reference, breast: BreastSplit) -> None:
    rng = random.Random(MIX_SEED)
    job_ids = [f"mix-{i:03d}" for i in range(JOBS)]
    t_ref = time.perf_counter()
    for job_id in job_ids:  # the clean models first, while the machine is not busy with faults
        reference(job_id, SHORT_JOB)
    ref_s = time.perf_counter() - t_ref
    tally = Tally()
    before = faulty.stats()
    t0 = time.perf_counter()
    for i, job_id in enumerate(job_ids):
        # Different faults per link and direction; a per-connection reset follows the "up" direction's.
        for proxy in faulty.proxies.values():
            proxy.set_faults(up=mixed_faults(rng, 1000 * i + 1), down=mixed_faults(rng, 1000 * i + 2))
        if not run_job(client, faulty, job_id, breast, tally):
            continue
        want_model, want_scores = reference(job_id, SHORT_JOB)
        problem = read_model(faulty, job_id).differs(want_model)
        if problem is not None:
            tally.wrong.append(f"{job_id}: {problem}")
            continue
        scores, errors = predict(client, job_id, breast.test_ids)
        for e in errors:
            tally.fail(job_id, e, tally.predict_failed)
        if scores is not None:
            if np.allclose(scores, want_scores, rtol=RTOL, atol=0):
                tally.predictions += 1
            else:
                tally.wrong.append(f"{job_id}: scores differ from the clean run's")
    seconds = time.perf_counter() - t0
    faulty.set_faults(Faults())
    fired = {link: after.since(before[link]).describe() for link, after in faulty.stats().items()}
    orphans = _orphans_at_passive(faulty, job_ids)
    print(
        f"\n{tally.line(seconds)}\n[faults] clean references: {JOBS} jobs in {ref_s:.0f} s; "
        f"jobs left set up at B: {len(orphans)}; injected: {fired}"
    )
    internal = _internal_errors(faulty)
    assert not tally.wrong, f"{len(tally.wrong)} wrong models: {tally.wrong[:5]}"
    assert not tally.hangs, f"{len(tally.hangs)} hangs: {tally.hangs[:5]}"
    assert not tally.unclear, f"failures without a clear reason: {tally.unclear[:5]}"
    assert not internal, f"internal errors in the service logs: {internal[:5]}"


def _orphans_at_passive(fed: LocalFederation, job_ids: list[str]) -> list[str]:
    """Jobs B set up and still holds (never finished nor aborted): a lost
    SetupJob reply must not leave one behind, each counts against B's quota."""
    log = Path(fed.services["passive"].log_path).read_text(errors="replace")
    setup = set(re.findall(r"event=job_setup job=(\S+)", log))
    ended = set(re.findall(r"event=job_ended job=(\S+)", log))
    return sorted((setup - ended) & set(job_ids))


def _internal_errors(fed: LocalFederation) -> list[str]:
    """Log lines of unexpected exceptions (an internal error is a bug even when the job survives)."""
    out = []
    for name, svc in fed.services.items():
        for line in Path(svc.log_path).read_text(errors="replace").splitlines():
            if "internal_error" in line or "event=tunnel_error" in line:
                out.append(f"{name}: {line[:300]}")
    return out


def test_faultproxy_alone_counts_what_it_did() -> None:
    """The proxy's own behaviour on a plain echo server: bytes arrive whole on
    a clean link, late under latency, cut under truncation, reset under resets."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                try:
                    while data := conn.recv(1 << 16):
                        conn.sendall(data)
                except OSError:
                    pass

    threading.Thread(target=echo, daemon=True).start()
    payload = bytes(range(256)) * 512  # 128 KiB

    def roundtrip(proxy: FaultProxy) -> tuple[bytes, str]:
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
            got, error = b"", ""
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                while data := s.recv(1 << 16):
                    got += data
            except OSError as exc:
                error = type(exc).__name__
            return got, error

    target = server.getsockname()[:2]
    try:
        with FaultProxy(target) as proxy:
            assert roundtrip(proxy) == (payload, "")
            assert proxy.stats.bytes_up == proxy.stats.bytes_down == len(payload)
            proxy.set_faults(Faults(latency_s=0.2))
            t0 = time.perf_counter()
            assert roundtrip(proxy) == (payload, "")
            assert time.perf_counter() - t0 >= 0.4  # 0.2 s each way
            proxy.set_faults(Faults(truncate_p=1.0))
            got, _ = roundtrip(proxy)
            assert len(got) < len(payload) and proxy.stats.truncations >= 1
            proxy.set_faults(Faults(reset_p=1.0))
            got, error = roundtrip(proxy)
            assert got == b"" and error in ("ConnectionResetError", "BrokenPipeError"), error
            assert proxy.stats.resets == 1
        with FaultProxy(target, Faults(bytes_per_s=256_000)) as proxy:
            t0 = time.perf_counter()
            assert roundtrip(proxy) == (payload, "")
            assert time.perf_counter() - t0 >= 0.45  # 128 KiB at 256 kB/s, both directions at once
    finally:
        server.close()
