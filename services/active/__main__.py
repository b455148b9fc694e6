"""Run the active party: `python -m services.active` (configured by VFL_* env vars)."""

from __future__ import annotations

import logging
import sys

from common.crypto import get_backend
from common.crypto.keystore import MIN_KEY_BITS, MIN_TEST_KEY_BITS, load_or_create_keypair
from common.data import load_party_csv
from common.errors import ConfigError, InvalidArgument
from common.rpc import TranscriptRecorder, create_server, serve_forever, setup_logging
from common.settings import ActiveSettings, load_settings
from services.active.party import ActiveParty
from services.active.peer import PassiveClient
from services.active.servicer import TrainingServicer
from vfl.v1 import client_pb2, client_pb2_grpc

SERVICE_NAME = client_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name


def main() -> None:
    settings = load_settings(ActiveSettings)
    setup_logging(settings.log_level, "active")
    try:
        backend = get_backend(settings.backend)
        data = load_party_csv(settings.data_csv, settings.id_column, settings.label_column)
        key = load_or_create_keypair(settings.data_dir, backend, settings.key_bits, settings.test_mode)
    except (ConfigError, InvalidArgument, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.test_mode:
        logging.getLogger("vfl").warning(
            "event=test_mode key_bits=%d: small keys allowed, not for real data", settings.key_bits
        )
    recorder = TranscriptRecorder(settings.transcript_path, "active") if settings.transcript_path else None
    peer = PassiveClient(settings.peer_address, settings.peer_timeout_s, recorder)
    party = ActiveParty(
        data, key, backend, settings.data_dir, peer, MIN_TEST_KEY_BITS if settings.test_mode else MIN_KEY_BITS
    )
    server, port = create_server(
        lambda s: client_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(party), s),
        [SERVICE_NAME],
        settings.host,
        settings.port,
        settings.max_workers,
    )
    logging.getLogger("vfl.active").info(
        "event=loaded rows=%d features=%d key=%s peer=%s",
        len(data.ids),
        data.n_features,
        key.public.fingerprint.hex()[:16],
        settings.peer_address,
    )
    serve_forever(server, port, settings.port_file, "active")


if __name__ == "__main__":
    main()
