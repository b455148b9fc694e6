"""Prometheus metrics of a service (docs/METRICS.md), on the process's own
registry, served over HTTP on VFL_METRICS_PORT (off by default).

The hot path pays nothing for what it already keeps: the job tables, the
PhaseClock (vfl.common.metrics.CLOCK) and the prediction budgets are read
when the endpoint is scraped (`Scraped`). What is counted as it happens is
a counter increment at the point where it happens: the server-side RPCs
(vfl.common.rpc.MetricsInterceptor) and, at the passive party, the
decryptions it serves or refuses, its iterations and the prediction ids it
charges.

No metric carries an id, a key, a feature, a label, a weight or a score:
label values are method names, status codes, phase names, job states, peer
identities and model ids. This module imports no gRPC (the protocol and
crypto layers may count through it).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from vfl.common.errors import ConfigError
from vfl.common.metrics import CLOCK, PhaseClock

log = logging.getLogger("vfl.prom")

# One registry per process (each service is its own process); not the
# library's default one, so that importing this module in a test or a CLI
# registers nothing global.
REGISTRY = CollectorRegistry(auto_describe=True)

# RPC steps take from a millisecond (health) to minutes (a 2048-bit step on a large batch).
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Served by every gRPC service (A, B): registered on REGISTRY by start_metrics.
RPC_DURATION = Histogram(
    "vfl_rpc_duration_seconds",
    "Server-side duration of each RPC this service served, by method and status code",
    ["method", "code"],
    buckets=RPC_BUCKETS,
    registry=None,
)
RPC_ERRORS = Counter(
    "vfl_rpc_errors",
    "RPCs this service answered with a status other than OK, by method and status code",
    ["method", "code"],
    registry=None,
)

# The passive party's own counters (B registers them; A serves the same
# families from its job records, with the same help texts).
DECRYPTIONS_HELP = (
    "Decryptions this party performed for its peer (served), and requests to decrypt its guards refused (refused)"
)
ITERATIONS_HELP = "Training iterations done (A) or served through step 5 (B)"
DECRYPTIONS = Counter("vfl_decryptions", DECRYPTIONS_HELP, ["result"], registry=None)
ITERATIONS = Counter("vfl_iterations", ITERATIONS_HELP, registry=None)
PREDICTION_IDS = Counter(
    "vfl_prediction_ids",
    "Ids scored against this party's prediction budgets, by peer identity and model id",
    ["peer", "model"],
    registry=None,
)
PREDICTION_IDS_REFUSED = Counter(
    "vfl_prediction_ids_refused",
    "Ids in prediction requests refused because they would exceed a prediction budget, by peer identity",
    ["peer"],
    registry=None,
)

PASSIVE_COUNTERS: Sequence[Collector] = (DECRYPTIONS, ITERATIONS, PREDICTION_IDS, PREDICTION_IDS_REFUSED)


def count_refused_decryption() -> None:
    DECRYPTIONS.labels(result="refused").inc()


def count_served_decryption(n: int = 1) -> None:
    DECRYPTIONS.labels(result="served").inc(n)


class Scraped(Collector):
    """Metric families computed when the endpoint is scraped, by `collect_fn`."""

    def __init__(self, collect_fn: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect_fn

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())


def clock_metrics(clock: PhaseClock = CLOCK) -> list[Metric]:
    """vfl_phase_seconds_total{phase} and vfl_bytes_sent_total from the process's PhaseClock."""
    snap = clock.snapshot()
    phases = CounterMetricFamily(
        "vfl_phase_seconds", "Seconds spent in each phase of the protocol (summed over threads)", labels=["phase"]
    )
    for name, seconds in sorted(snap["phases_s"].items()):
        phases.add_metric([name], float(seconds))
    sent = CounterMetricFamily("vfl_bytes_sent", "Bytes of protocol payload this party sent to its peers")
    sent.add_metric([], float(snap["bytes_sent"]))
    return [phases, sent]


def jobs_metric(counts: dict[str, int], states: Iterable[str] = ()) -> GaugeMetricFamily:
    """vfl_jobs{state}: `counts` by state name, with 0 for each of `states` not in it."""
    gauge = GaugeMetricFamily("vfl_jobs", "Training jobs by state", labels=["state"])
    for state in sorted(set(states) | set(counts)):
        gauge.add_metric([state], float(counts.get(state, 0)))
    return gauge


def start_metrics(host: str, port: int, service: str, rpc: bool = True) -> int | None:
    """Serve REGISTRY on host:port (nothing with port 0), with the PhaseClock's
    metrics, the RPC metrics (`rpc`: a gRPC service), vfl_build_info and the
    process's own; the service adds its collectors with `add_collectors`
    once it has them (a scrape before that has only these). Returns the
    bound port. A port that cannot be bound is a ConfigError naming
    VFL_METRICS_PORT (an unknown host: VFL_METRICS_HOST)."""
    if not port:
        return None
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series, as documented
    add_collectors(Scraped(clock_metrics), ProcessCollector(registry=None))
    if rpc:
        add_collectors(RPC_DURATION, RPC_ERRORS)
    build = Info("vfl_build", "This service's name and version", registry=REGISTRY)
    build.info({"service": service, "version": _version()})
    try:
        server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    except socket.gaierror:
        raise ConfigError(f"VFL_METRICS_HOST: {host}: cannot be resolved to an address") from None
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"VFL_METRICS_HOST: {host} is not an address of this machine") from None
        what = exc.strerror or str(exc)
        raise ConfigError(f"VFL_METRICS_PORT: could not serve metrics on {host}:{port}: {what}") from None
    bound = int(server.server_address[1])
    log.info("event=metrics_serving service=%s host=%s port=%d", service, host, bound)
    return bound


def add_collectors(*collectors: Collector) -> None:
    """Register collectors on REGISTRY (scraped from then on)."""
    for c in collectors:
        REGISTRY.register(c)


def _version() -> str:
    try:
        return version("vfl")
    except PackageNotFoundError:
        return "unknown"
