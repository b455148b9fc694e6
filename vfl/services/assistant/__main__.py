"""Run the assistant: `python -m vfl.services.assistant` (configured by VFL_* env vars)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from vfl.common.oserrors import check_port_free
from vfl.common.prom import Scraped, add_collectors, start_metrics
from vfl.common.rpc import TranscriptRecorder, setup_logging
from vfl.common.settings import AssistantSettings, config_errors, load_settings
from vfl.common.storage import atomic_write_text
from vfl.services.assistant.proxy import TunnelProxy, TunnelStats, serve

log = logging.getLogger("vfl.assistant")


def main() -> None:
    settings = load_settings(AssistantSettings)
    setup_logging(settings.log_level, "assistant")
    with config_errors():
        check_port_free(settings.host, settings.port)
        start_metrics(*settings.metrics_address, "assistant", rpc=False)
    recorder = None
    if settings.transcript_path is not None:
        rec = TranscriptRecorder(settings.transcript_path, "assistant")
        recorder = rec.record_tunnel
    token = settings.relay_token_value()  # load_settings checked that there is one
    proxy = TunnelProxy(
        settings.upstream_address,
        token,
        settings.connect_timeout_s,
        settings.idle_timeout_s,
        settings.max_tunnels,
        recorder,
    )
    add_collectors(Scraped(lambda: tunnel_metrics(proxy.stats)))
    asyncio.run(_run(proxy, settings.host, settings.port, settings.port_file))


def tunnel_metrics(stats: TunnelStats) -> list[Metric]:
    """C's tunnels and the bytes it relayed (added when a tunnel closes), read at scrape time."""
    opened = CounterMetricFamily("vfl_tunnels_opened", "CONNECT tunnels the assistant opened")
    opened.add_metric([], float(stats.opened))
    refused = CounterMetricFamily("vfl_tunnels_refused", "CONNECT requests the assistant refused")
    refused.add_metric([], float(stats.refused))
    active = GaugeMetricFamily("vfl_tunnels_open", "CONNECT tunnels open now")
    active.add_metric([], float(stats.active))
    relayed = CounterMetricFamily(
        "vfl_relayed_bytes", "Bytes relayed through closed tunnels, by direction", labels=["direction"]
    )
    relayed.add_metric(["a_to_b"], float(stats.a_to_b_bytes))
    relayed.add_metric(["b_to_a"], float(stats.b_to_a_bytes))
    return [opened, refused, active, relayed]


async def _run(proxy: TunnelProxy, host: str, port: int, port_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def bound(real_port: int) -> None:
        if port_file is not None:
            atomic_write_text(port_file, str(real_port), mode=0o644)
        log.info(
            "event=serving service=assistant port=%d mode=connect-tunnel upstream=%s relay_token=%s",
            real_port,
            proxy.upstream,
            "required" if proxy.token is not None else "none",
        )

    await serve(proxy, host, port, bound, stop)


if __name__ == "__main__":
    main()
