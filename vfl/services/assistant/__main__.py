"""Run the assistant: `python -m vfl.services.assistant` (configured by VFL_* env vars)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from vfl.common.oserrors import check_port_free
from vfl.common.rpc import TranscriptRecorder, setup_logging
from vfl.common.settings import AssistantSettings, config_errors, load_settings
from vfl.common.storage import atomic_write_text
from vfl.services.assistant.proxy import TunnelProxy, serve

log = logging.getLogger("vfl.assistant")


def main() -> None:
    settings = load_settings(AssistantSettings)
    setup_logging(settings.log_level, "assistant")
    with config_errors():
        check_port_free(settings.host, settings.port)
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
    asyncio.run(_run(proxy, settings.host, settings.port, settings.port_file))


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
