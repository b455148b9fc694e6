"""A party's crypto on its own Ray cluster (VFL_COMPUTE=ray).

`RayBackend` is an `HEBackend`: the sessions and services call it as they
call the local one, and it splits the large operations into blocks across
long-lived `CryptoWorker` actors, one per CPU of the party's cluster:

- encryption of many plaintexts (a residual share, prediction scores) by
  blocks of plaintexts;
- X^T [[v]] by blocks of columns (batch rows): each worker returns one
  partial product per feature, and the driver multiplies the partials, so the
  result is the same group element the local product gives, bit for bit;
- decryption of many ciphertexts (prediction) by blocks.

Small operations (the p + 1 hiding encryptions and the p decryptions of an
iteration, additions) stay in the driver: a Ray task costs about a
millisecond, more than they do.

Keys and tables go to a worker once, never with a task: a task names its key
by fingerprint; a worker that does not hold it (new, or restarted after a
crash) answers MISSING, and the driver sends the key (`add_keys`) and the
block again. The worker builds its fixed-base tables and fills its own
randomness pools (`pool.FILLER`, in the worker's idle time). A private key is
sent only to this party's own workers, and only when a decryption is large
enough to be split: with the training steps' small decryptions it never
leaves the service's process.

Failure: actors restart (max_restarts=-1) and Ray retries their tasks; a
block whose worker cannot be reached after that is computed in the driver.
A block is a pure function of its inputs (an encryption block draws fresh
randomness), so a retried block changes no decrypted value: the session
above still releases one decryption per step, and the model is the same.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import gmpy2
import numpy as np
from gmpy2 import mpz

from vfl.common.crypto.backend import CipherVector, HEBackend, PrivateKey, PublicKey, get_backend
from vfl.common.crypto.pool import GATE
from vfl.common.errors import ConfigError, InvalidArgument

log = logging.getLogger("vfl.compute")

MISSING = "missing"
# Below these sizes an operation stays in the driver (a task's overhead is
# about a millisecond; a 2048-bit encryption about 30 us, a product term 12 us).
MIN_BLOCK = 256
MIN_TERMS = 4096
# A block of at most this many plaintexts, ciphertexts or product columns,
# so that a retried block costs a fraction of an operation.
MAX_BLOCK = 8192
# Tries of one block on the cluster before the driver computes it itself.
CLUSTER_TRIES = 3
# Tries of ray.init (1, 2, 4, 8 s apart).
CONNECT_TRIES = 5
# How long the workers may take to be placed (nodes joining) before start-up fails.
START_TIMEOUT_S = 300.0


Answer = tuple[str, str, float, list[int]]


class CryptoWorker:
    """One Ray actor: the inner backend (in-process products) with the keys
    it has been sent, by fingerprint. Every method answers (status, node,
    seconds, value) so that the driver sees where a block ran and for how long."""

    def __init__(self, backend: str) -> None:
        self.backend = get_backend(backend)
        self.backend.set_workers(1)
        self.public: dict[bytes, PublicKey] = {}
        self.private: dict[bytes, PrivateKey] = {}
        import ray

        self.node = str(ray.get_runtime_context().get_node_id())
        self.served = 0  # blocks answered since this process started

    def where(self) -> tuple[str, int]:
        return self.node, os.getpid()

    def stats(self) -> dict[str, Any]:
        """Where this worker runs and what it has done (for operators and tests)."""
        return {
            "node": self.node,
            "pid": os.getpid(),
            "served": self.served,
            "public_keys": len(self.public),
            "private_keys": len(self.private),
        }

    def add_keys(self, public: list[dict[str, Any]], private: list[dict[str, Any]]) -> str:
        with GATE.busy():
            for d in public:
                key = PublicKey.from_dict(d)
                if key.fingerprint not in self.public:
                    self.public[key.fingerprint] = key
                    self.backend.prepare(key)
            for d in private:
                sk = PrivateKey.from_dict(d)
                self.private[sk.public.fingerprint] = sk
                self.public.setdefault(sk.public.fingerprint, sk.public)
        return self.node

    def _answer(self, work: Callable[[], list[int]]) -> Answer:
        start = time.perf_counter()
        with GATE.busy():
            value = work()
        self.served += 1
        return "ok", self.node, time.perf_counter() - start, value

    def encrypt(self, fp: bytes, plaintexts: list[int], hiding: bool) -> Answer:
        key = self.public.get(fp)
        if key is None:
            return MISSING, self.node, 0.0, []
        return self._answer(lambda: list(self.backend.encrypt(key, plaintexts, hiding=hiding).values))

    def decrypt(self, fp: bytes, ciphers: list[int]) -> Answer:
        sk = self.private.get(fp)
        if sk is None:
            return MISSING, self.node, 0.0, []
        return self._answer(lambda: self.backend.decrypt(sk, CipherVector(sk.public, tuple(ciphers))))

    def matvec(self, fp: bytes, matrix: np.ndarray, ciphers: list[int]) -> Answer:
        key = self.public.get(fp)
        if key is None:
            return MISSING, self.node, 0.0, []
        return self._answer(lambda: list(self.backend.matvec(matrix, CipherVector(key, tuple(ciphers))).values))


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes: ray.init waits long for a GCS that is
    not there. 'auto' and ray:// addresses are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"VFL_RAY_ADDRESS: {address[:80]!r}: expected host:port of the Ray head, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(
            f"VFL_RAY_ADDRESS: nothing answers at {address} ({exc.strerror or exc}); "
            "expected the head of this party's Ray cluster (ray start --head)"
        ) from None


def _blocks(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges: at least `parts` (if n allows), none over MAX_BLOCK."""
    count = max(1, min(n, max(parts, -(-n // MAX_BLOCK))))
    edges = np.linspace(0, n, count + 1).astype(int).tolist()
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


class RayBackend(HEBackend):
    """The inner backend's keys and scheme, its large operations on Ray."""

    def __init__(
        self,
        inner: str,
        address: str | None = None,
        workers: int = 0,
        min_block: int = MIN_BLOCK,
        min_terms: int = MIN_TERMS,
        cpus_per_worker: float = 1.0,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.inner = get_backend(inner)
        self.inner.set_workers(1)
        self.name = self.inner.name
        self.own_scheme = self.inner.own_scheme
        self.schemes = self.inner.schemes
        self.address = address or None
        self.min_block = min_block
        self.min_terms = min_terms
        self._lock = threading.Lock()
        self._private: dict[bytes, PrivateKey] = {}
        self._public: dict[bytes, PublicKey] = {}
        # Per worker: (fingerprint, private?) of what it has been sent. A
        # private key only for a decryption: never with an encryption under
        # the party's own public key.
        self._held: list[set[tuple[bytes, bool]]] = []
        self.blocks_by_node: Counter[str] = Counter()
        self.retried_blocks = 0
        self.local_blocks = 0
        self.block_seconds = 0.0  # time the workers spent in blocks (for projections)
        self.cpus_per_worker = cpus_per_worker
        self.start_timeout_s = start_timeout_s
        self._actors = self._start(workers)

    # --- cluster --------------------------------------------------------

    def _start(self, workers: int) -> list[Any]:
        try:
            import ray
        except ImportError:
            raise ConfigError("VFL_COMPUTE=ray: the ray package is not installed (pip install 'vfl[ray]')") from None
        if not ray.is_initialized():
            self._connect(ray, workers)
        count = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))  # type: ignore[no-untyped-call]
        actor = ray.remote(CryptoWorker)
        # Named, so that an operator (or a test) attached to the cluster can find them.
        prefix = f"vfl-crypto-{os.getpid()}-{id(self):x}"
        actors: list[Any] = [
            actor.options(
                name=f"{prefix}-{i}",
                num_cpus=self.cpus_per_worker,
                max_restarts=-1,
                max_task_retries=-1,
                scheduling_strategy="SPREAD",
            ).remote(self.inner.name)
            for i in range(count)
        ]
        self._held = [set() for _ in actors]
        try:
            placed = ray.get([a.where.remote() for a in actors], timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            cpus = ray.cluster_resources().get("CPU", 0)  # type: ignore[no-untyped-call]
            for a in actors:
                ray.kill(a)
            raise ConfigError(
                f"VFL_RAY_WORKERS: {count} workers of {self.cpus_per_worker:g} CPU each were not placed within "
                f"{self.start_timeout_s:g} s; the cluster has {cpus:g} CPUs (are its worker nodes up?)"
            ) from None
        nodes = Counter(node for node, _ in placed)
        log.info("event=ray_workers workers=%d nodes=%d address=%s", count, len(nodes), self.address or "local")
        return actors

    def _connect(self, ray: Any, workers: int) -> None:
        """ray.init, tried again a few times: a Ray Client server can fail a
        connection while its head is still starting (seen under load)."""
        if self.address:
            _check_reachable(self.address)
        for attempt in range(CONNECT_TRIES):
            try:
                if self.address:
                    ray.init(address=self.address, namespace="vfl", log_to_driver=False, logging_level=logging.WARNING)
                else:
                    # "local": a new instance, even where `ray start` left one running.
                    ray.init(
                        address="local",
                        num_cpus=workers or os.cpu_count() or 1,
                        namespace="vfl",
                        include_dashboard=False,
                        log_to_driver=False,
                        logging_level=logging.WARNING,
                    )
                return
            except (ConnectionError, RuntimeError, ValueError) as exc:
                ray.shutdown()
                if attempt + 1 < CONNECT_TRIES:
                    log.warning("event=ray_connect_retry attempt=%d error=%s", attempt + 1, type(exc).__name__)
                    time.sleep(2**attempt)
                    continue
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                if self.address:
                    raise ConfigError(f"VFL_RAY_ADDRESS: could not connect to Ray at {self.address}: {first}") from None
                raise ConfigError(f"VFL_COMPUTE=ray: could not start a Ray instance on this machine: {first}") from None

    @property
    def workers(self) -> int:
        return len(self._actors)

    def worker_processes(self) -> list[tuple[str, int]]:
        """(node id, pid) of every worker, for tests and operators."""
        import ray

        return list(ray.get([a.where.remote() for a in self._actors]))

    def worker_stats(self) -> list[dict[str, Any]]:
        import ray

        return list(ray.get([a.stats.remote() for a in self._actors]))

    def shutdown(self) -> None:
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []

    def _send_key(self, i: int, fp: bytes, private: bool) -> None:
        import ray

        if private:
            ray.get(self._actors[i].add_keys.remote([], [self._private[fp].to_dict()]))
        else:
            ray.get(self._actors[i].add_keys.remote([self._public[fp].to_dict()], []))
        self._held[i].add((fp, private))

    def _run(
        self,
        method: str,
        fp: bytes,
        args: list[tuple[Any, ...]],
        local: Callable[[int], list[int]],
    ) -> list[list[int]]:
        """Each block's args on a worker (block b on worker b mod W), each
        answer in block order; a MISSING answer gets the key and a second
        try, a lost worker Ray's restart, and a block that still fails is
        computed in the driver by local(b)."""
        import ray

        private = method == "decrypt"
        from ray.exceptions import RayError

        results: list[list[int] | None] = [None] * len(args)
        tries = [0] * len(args)
        pending: dict[Any, tuple[int, int]] = {}

        def submit(b: int) -> None:
            i = (b + tries[b]) % len(self._actors)
            if (fp, private) not in self._held[i]:
                self._send_key(i, fp, private)
            pending[getattr(self._actors[i], method).remote(fp, *args[b])] = (b, i)

        for b in range(len(args)):
            submit(b)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            b, i = pending.pop(ready[0])
            try:
                status, node, seconds, value = ray.get(ready[0])
            except RayError as exc:
                status, node, seconds, value = "failed", "", 0.0, []
                log.warning("event=ray_block_failed method=%s block=%d error=%s", method, b, type(exc).__name__)
            if status == "ok":
                results[b] = value
                self.blocks_by_node[node] += 1
                self.block_seconds += seconds
                self._report()
                continue
            if status == MISSING:
                self._held[i].discard((fp, private))
            tries[b] += 1
            self.retried_blocks += 1
            if tries[b] < CLUSTER_TRIES:
                submit(b)
            else:
                results[b] = local(b)
                self.local_blocks += 1
        return [r if r is not None else [] for r in results]

    def _report(self) -> None:
        """A line at 1, 2, 4, 8, ... blocks: where the work went, a few dozen
        lines in a service's life."""
        done = sum(self.blocks_by_node.values())
        if done & (done - 1) == 0:
            log.info(
                "event=ray_blocks blocks=%d nodes=%d retried=%d in_service=%d",
                done,
                len(self.blocks_by_node),
                self.retried_blocks,
                self.local_blocks,
            )

    # --- HEBackend ------------------------------------------------------

    def generate_keypair(self, bits: int) -> PrivateKey:
        return self.inner.generate_keypair(bits)

    def prepare(self, key: PublicKey | PrivateKey) -> None:
        self.inner.prepare(key)
        with self._lock:
            if isinstance(key, PrivateKey):
                self._private[key.public.fingerprint] = key
                key = key.public
            self._public.setdefault(key.fingerprint, key)

    def _know(self, key: PublicKey) -> bytes:
        self.require_scheme(key, "ray")
        self._public.setdefault(key.fingerprint, key)
        return key.fingerprint

    def encrypt(self, key: PublicKey, plaintexts: Sequence[int], hiding: bool = False) -> CipherVector:
        if len(plaintexts) < self.min_block:
            return self.inner.encrypt(key, plaintexts, hiding=hiding)
        for i, m in enumerate(plaintexts):
            if not 0 <= m < key.n:
                raise InvalidArgument(f"plaintext {i}: expected a residue in [0, n)")
        fp = self._know(key)
        spans = _blocks(len(plaintexts), self.workers)
        parts = [list(plaintexts[a:b]) for a, b in spans]
        out = self._run(
            "encrypt",
            fp,
            [(p, hiding) for p in parts],
            lambda b: list(self.inner.encrypt(key, parts[b], hiding=hiding).values),
        )
        return CipherVector(key, tuple(c for block in out for c in block))

    def decrypt(self, key: PrivateKey, ciphers: CipherVector) -> list[int]:
        ciphers.require_key(key.public, "decrypt")
        if len(ciphers) < self.min_block:
            return self.inner.decrypt(key, ciphers)
        self.prepare(key)
        spans = _blocks(len(ciphers), self.workers)
        parts = [list(ciphers.values[a:b]) for a, b in spans]
        out = self._run(
            "decrypt",
            key.public.fingerprint,
            [(p,) for p in parts],
            lambda b: self.inner.decrypt(key, CipherVector(key.public, tuple(parts[b]))),
        )
        return [v for block in out for v in block]

    def add(self, a: CipherVector, b: CipherVector) -> CipherVector:
        return self.inner.add(a, b)

    def multiply(self, ciphers: CipherVector, scalars: Sequence[int]) -> CipherVector:
        return self.inner.multiply(ciphers, scalars)

    def matvec(self, matrix: np.ndarray, ciphers: CipherVector) -> CipherVector:
        rows, cols = matrix.shape
        ciphers.require_length(cols, "matvec")
        if rows * cols < self.min_terms or cols < 2:
            return self.inner.matvec(matrix, ciphers)
        fp = self._know(ciphers.key)
        spans = _blocks(cols, self.workers)
        mats = [np.ascontiguousarray(matrix[:, a:b]) for a, b in spans]
        parts = [list(ciphers.values[a:b]) for a, b in spans]
        out = self._run(
            "matvec",
            fp,
            list(zip(mats, parts, strict=True)),
            lambda b: list(self.inner.matvec(mats[b], CipherVector(ciphers.key, tuple(parts[b]))).values),
        )
        # The product over all columns is the product of the blocks' partial products.
        m = mpz(ciphers.key.cipher_modulus)
        total = [mpz(1)] * rows
        for block in out:
            total = [gmpy2.mul(t, mpz(c)) % m for t, c in zip(total, block, strict=True)]
        return CipherVector(ciphers.key, tuple(int(t) for t in total))
