"""Run the active party: `python -m vfl.services.active` (configured by VFL_* env vars)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from vfl.common.party_setup import load_party
from vfl.common.prom import DECRYPTIONS_HELP, ITERATIONS_HELP, Scraped, add_collectors, jobs_metric, start_metrics
from vfl.common.rpc import TranscriptRecorder, create_server, serve_forever, setup_logging
from vfl.common.settings import ActiveSettings, config_errors, identities, load_settings
from vfl.services.active.jobs import State
from vfl.services.active.party import ActiveParty
from vfl.services.active.peer import PassiveClient
from vfl.services.active.servicer import TrainingServicer
from vfl.v1 import client_pb2, client_pb2_grpc

SERVICE_NAME = client_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name


def job_metrics(party: ActiveParty) -> Iterable[Metric]:
    """vfl_jobs{state}, vfl_iterations_total and vfl_decryptions_total from
    A's job records, read at scrape time (nothing on the training path).
    A decrypts one masked gradient of B's, z_B, per iteration: its served
    decryptions are its iterations done (an iteration restarted after a
    failure decrypts again and is not counted twice)."""
    jobs = party.jobs()
    yield jobs_metric(Counter(j.state.name.lower() for j in jobs), (s.name.lower() for s in State))
    done = float(sum(j.iteration for j in jobs))
    iterations = CounterMetricFamily("vfl_iterations", ITERATIONS_HELP)
    iterations.add_metric([], done)
    yield iterations
    decryptions = CounterMetricFamily("vfl_decryptions", DECRYPTIONS_HELP, labels=["result"])
    decryptions.add_metric(["served"], done)  # no "refused": B sends A no request it could refuse
    yield decryptions


def main() -> None:
    settings = load_settings(ActiveSettings)
    setup_logging(settings.log_level, "active")
    with config_errors():
        start_metrics(*settings.metrics_address, "active")
    res = load_party(settings, label_column=settings.label_column)
    recorder = TranscriptRecorder(settings.transcript_path, "active") if settings.transcript_path else None
    # One passive party (VFL_PEER_ADDRESS), or several by name (VFL_PEERS),
    # each certificate carrying the party's name.
    parties = {
        name: PassiveClient(address, settings.peer_timeout_s, recorder, settings.tls, name)
        for name, address in settings.passive_parties().items()
    }
    peer = (
        next(iter(parties.values()))
        if parties
        else PassiveClient(
            settings.peer_address or "",
            settings.peer_timeout_s,
            recorder,
            settings.tls,
            settings.peer_tls_name,
            assistant=settings.assistant_address,
            relay_token=settings.relay_token_value(),
        )
    )
    party = ActiveParty(
        res.data,
        res.key,
        res.backend,
        settings.data_dir,
        peer,
        res.min_peer_bits,
        dp_clip_norm=settings.dp_clip_norm,
        test_weights_seed=settings.test_initial_weights_seed,
        parties=parties,
    )
    add_collectors(Scraped(lambda: job_metrics(party)))
    party.resume_jobs()  # jobs that were running when this process stopped
    with config_errors():
        server, port = create_server(
            lambda s: client_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(party), s),
            [SERVICE_NAME],
            settings.host,
            settings.port,
            settings.max_workers,
            tls=settings.tls,
            allowed={SERVICE_NAME: identities(settings.allowed_clients)},
        )
    logging.getLogger("vfl.active").info(
        "event=loaded rows=%d features=%d key=%s peer=%s via=%s",
        len(res.data.ids),
        res.data.n_features,
        res.key.public.fingerprint.hex()[:16],
        settings.peers or settings.peer_address,
        settings.assistant_address or "direct",
    )
    serve_forever(server, port, settings.port_file, "active")


if __name__ == "__main__":
    main()
