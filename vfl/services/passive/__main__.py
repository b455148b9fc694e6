"""Run the passive party: `python -m vfl.services.passive` (configured by VFL_* env vars)."""

from __future__ import annotations

import logging

from vfl.common.party_setup import load_party
from vfl.common.prom import PASSIVE_COUNTERS, Scraped, add_collectors, start_metrics
from vfl.common.rpc import RecordingInterceptor, TranscriptRecorder, create_server, serve_forever, setup_logging
from vfl.common.settings import PassiveSettings, config_errors, identities, load_settings
from vfl.services.passive.party import PassiveParty
from vfl.services.passive.policy import PassivePolicy
from vfl.services.passive.servicer import PartyServicer
from vfl.v1 import party_pb2, party_pb2_grpc

SERVICE_NAME = party_pb2.DESCRIPTOR.services_by_name["PartyService"].full_name


def main() -> None:
    settings = load_settings(PassiveSettings)
    setup_logging(settings.log_level, "passive")
    with config_errors():
        start_metrics(*settings.metrics_address, "passive")
    res = load_party(settings)
    policy = PassivePolicy(
        min_learning_rate=settings.min_learning_rate,
        min_iterations=settings.min_iterations,
        allow_small_batch=settings.allow_small_batch,
        max_models_per_peer=settings.max_models_per_peer,
        max_predict_ids_per_model=settings.max_predict_ids_per_model,
        predict_ids_per_window=settings.predict_ids_per_window,
        predict_window_s=settings.predict_window_s,
        predict_scope=settings.predict_scope,
        dp_clip_norm=settings.dp_clip_norm,
        dp_share_clip=settings.dp_share_clip,
        max_dp_epsilon=settings.max_dp_epsilon,
        max_alignment_size=settings.max_alignment_size,
        max_open_alignments=settings.max_open_alignments,
    )
    party = PassiveParty(
        res.data, res.key, res.backend, settings.data_dir, policy, test_weights_seed=settings.test_initial_weights_seed
    )
    add_collectors(*PASSIVE_COUNTERS, Scraped(party.scraped_metrics))
    party.restore_jobs()  # jobs that were running when this process stopped
    servicer = PartyServicer(party, res.min_peer_bits)
    interceptors = []
    if settings.transcript_path is not None:
        interceptors.append(RecordingInterceptor(TranscriptRecorder(settings.transcript_path, "passive")))
    with config_errors():
        server, port = create_server(
            lambda s: party_pb2_grpc.add_PartyServiceServicer_to_server(servicer, s),
            [SERVICE_NAME],
            settings.host,
            settings.port,
            settings.max_workers,
            interceptors,
            tls=settings.tls,
            allowed={SERVICE_NAME: identities(settings.allowed_peers)},
        )
    logging.getLogger("vfl.passive").info(
        "event=loaded rows=%d features=%d key=%s",
        len(res.data.ids),
        res.data.n_features,
        res.key.public.fingerprint.hex()[:16],
    )
    serve_forever(server, port, settings.port_file, "passive")


if __name__ == "__main__":
    main()
