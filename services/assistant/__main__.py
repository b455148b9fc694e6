"""Run the assistant: `python -m services.assistant` (configured by VFL_* env vars)."""

from __future__ import annotations

from common.rpc import TranscriptRecorder, create_server, serve_forever, setup_logging
from common.settings import AssistantSettings, identities, load_settings
from services.assistant.relay import PARTY_SERVICE, RelayHandler


def main() -> None:
    settings = load_settings(AssistantSettings)
    setup_logging(settings.log_level, "assistant")
    recorder = TranscriptRecorder(settings.transcript_path, "assistant") if settings.transcript_path else None
    relay = RelayHandler(
        settings.upstream_address, settings.peer_timeout_s, recorder, settings.tls, settings.peer_tls_name
    )
    server, port = create_server(
        lambda s: s.add_generic_rpc_handlers((relay,)),
        [PARTY_SERVICE.full_name],
        settings.host,
        settings.port,
        settings.max_workers,
        tls=settings.tls,
        allowed={PARTY_SERVICE.full_name: identities(settings.allowed_peers)},
    )
    serve_forever(server, port, settings.port_file, "assistant")


if __name__ == "__main__":
    main()
