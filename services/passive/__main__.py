"""Run the passive party: `python -m services.passive` (configured by VFL_* env vars)."""

from __future__ import annotations

import logging
import sys

from common.crypto import get_backend
from common.crypto.keystore import load_or_create_keypair
from common.data import load_party_csv
from common.errors import ConfigError
from common.rpc import RecordingInterceptor, TranscriptRecorder, create_server, serve_forever, setup_logging
from common.settings import PassiveSettings, load_settings
from services.passive.party import PassiveParty
from services.passive.servicer import PartyServicer
from vfl.v1 import party_pb2, party_pb2_grpc

SERVICE_NAME = party_pb2.DESCRIPTOR.services_by_name["PartyService"].full_name


def main() -> None:
    settings = load_settings(PassiveSettings)
    setup_logging(settings.log_level, "passive")
    try:
        backend = get_backend(settings.backend)
        data = load_party_csv(settings.data_csv, settings.id_column)
        key = load_or_create_keypair(settings.data_dir, backend, settings.key_bits, settings.test_mode)
    except (ConfigError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.test_mode:
        logging.getLogger("vfl").warning(
            "event=test_mode key_bits=%d: small keys allowed, not for real data", settings.key_bits
        )
    party = PassiveParty(data, key, backend, settings.data_dir)
    interceptors = []
    if settings.transcript_path is not None:
        interceptors.append(RecordingInterceptor(TranscriptRecorder(settings.transcript_path, "passive")))
    server, port = create_server(
        lambda s: party_pb2_grpc.add_PartyServiceServicer_to_server(PartyServicer(party, settings.test_mode), s),
        [SERVICE_NAME],
        settings.host,
        settings.port,
        settings.max_workers,
        interceptors,
    )
    logging.getLogger("vfl.passive").info(
        "event=loaded rows=%d features=%d key=%s", len(data.ids), data.n_features, key.public.fingerprint.hex()[:16]
    )
    serve_forever(server, port, settings.port_file, "passive")


if __name__ == "__main__":
    main()
