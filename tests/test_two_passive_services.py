"""Two passive parties, each the real passive service in its own process
with its default policy, the breast split's 20 passive columns divided
between them; A's protocol session in this process talks to both over gRPC
(`PartyServicePort`): one PSI with each, the job set up at each with the
other named, the pairwise protocol of docs/PARTIES.md with every message
between B_1 and B_2 relayed by A. Both B's store their shards; every party's
weights equal the plain-numpy run on the joined table, and A's scores with
both B's (PredictScores at each) are the model's."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.attacks.harness import active_view, passive_features
from tests.conftest import TEST_KEY_BITS, BreastSplit, read_shard
from tests.reference_run import assert_weights_close
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common import serde
from vfl.common.crypto import get_backend
from vfl.common.errors import PeerError
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.alignment import common_rows
from vfl.common.protocol.batching import Batch, batch_schedule, coalition_feature_counts, min_batch_size
from vfl.common.protocol.reference import train_plain
from vfl.common.protocol.sessions import ActiveSession, PartyInfo, TrainingPlan
from vfl.services.active.alignment import align_as_active
from vfl.services.active.peer import PartyServicePort, PassiveClient, PredictionServicePort

BACKEND = get_backend("ou")
CONFIG = JobConfig(batch_size=64, epochs=2, seed=13, loss_every=3, max_iterations=12, learning_rate=0.2)
SPLIT = {"b1": range(0, 10), "b2": range(10, 20)}


def split_passive_csv(tmp: Path) -> dict[str, Path]:
    with BUNDLED_PASSIVE.open(newline="") as fh:
        rows = list(csv.reader(fh))
    out = {}
    for name, cols in SPLIT.items():
        path = tmp / f"{name}.csv"
        with path.open("w", newline="") as fh:
            csv.writer(fh).writerows([[r[0], *(r[1 + c] for c in cols)] for r in rows])
        out[name] = path
    return out


def passive_service(workdir: Path, csv_path: Path, backend: str = "ou", plant: str | None = None) -> LocalFederation:
    fed = LocalFederation(
        workdir,
        BUNDLED_ACTIVE,
        csv_path,
        key_bits=TEST_KEY_BITS,
        assistant=False,
        tls=False,
        extra_env={"VFL_BACKEND": backend},
        plants={"passive": plant} if plant else {},
    )
    fed.start("passive")
    return fed


def test_two_passive_services_train_the_plain_model(tmp_path: Path, breast: BreastSplit) -> None:
    paths = split_passive_csv(tmp_path)
    feds = {name: passive_service(tmp_path / name, path) for name, path in paths.items()}
    clients = {n: PassiveClient(f.services["passive"].address, timeout_s=60) for n, f in feds.items()}
    try:
        key = BACKEND.generate_keypair(TEST_KEY_BITS)
        keys, fps = {}, {}
        for n, c in clients.items():
            keys[n], fps[n] = c.exchange_keys(key.public, TEST_KEY_BITS)
        features = {n: c.passive_features for n, c in clients.items()}
        assert features == {"b1": 10, "b2": 10}
        records = {n: align_as_active(c, f"align-{n}", breast.train_ids) for n, c in clients.items()}
        rows = common_rows({n: list(r.ids) for n, r in records.items()})
        assert sorted(rows.ids) == sorted(breast.train_ids)
        view = active_view(rows.ids)
        infos = [PartyInfo(n, keys[n], features[n]) for n in sorted(clients)]
        job_id = "two-passive"
        for n, c in clients.items():
            others = [i for i in infos if i.name != n]
            c.setup_job(
                job_id,
                CONFIG,
                fps[n],
                view.p_active,
                records[n].alignment_id,
                rows.positions[n],
                party_name=n,
                peers=others,
            )
        p_a, p_b = coalition_feature_counts(view.p_active, list(features.values()))
        floor = min_batch_size(p_a, p_b, False)
        schedule = batch_schedule(
            len(rows.ids), CONFIG.batch_size, CONFIG.epochs, CONFIG.seed, floor, CONFIG.max_iterations
        )
        ports = {
            n: PartyServicePort(
                c,
                job_id,
                fps[n],
                key.public,
                keys[n],
                features[n],
                peers={o: keys[o] for o in clients if o != n},
                name=n,
            )
            for n, c in clients.items()
        }
        w0 = np.random.default_rng(3).normal(0, 0.01, view.x.shape[1])
        session = ActiveSession(BACKEND, key, view.x, view.y, w0, TrainingPlan.of(CONFIG), infos, ports)
        losses = {}
        for t, batch in enumerate(schedule):
            due = (t + 1) % CONFIG.loss_every == 0 or t + 1 == len(schedule)
            loss = session.iteration(t, batch.rows.tolist(), check_loss=due)
            assert (loss is not None) == due
            if loss is not None:
                losses[t] = loss
        for n, c in clients.items():
            assert c.finish_job(serde.step_header(job_id, len(schedule), fps[n]), aborted=False)
        shards = {n: read_shard(feds[n], "passive", job_id) for n in clients}
        # Serving: A scores 50 of the model's rows with both B's (PredictScores at each).
        scored = np.arange(50)
        predict_ports = {
            n: PredictionServicePort(c, job_id, fps[n], records[n].alignment_id, [rows.positions[n][i] for i in scored])
            for n, c in clients.items()
        }
        probabilities = session.scores(view.x[scored], session.w, predict_ports)
    finally:
        for c in clients.values():
            c.close()
        for f in feds.values():
            f.stop()
    joined = passive_features(rows.ids)  # all 20 columns, standardised per column as each B does
    trace: list[dict[str, np.ndarray]] = []
    w_a, w_b = train_plain(
        view.x[:, :-1],
        joined,
        view.y,
        w0,
        np.concatenate([np.asarray(shards[n]["initial_weights"]) for n in sorted(SPLIT)]),
        [Batch(b.epoch, b.rows) for b in schedule],
        TrainingPlan.of(CONFIG).optimizer,
        CONFIG.l2,
        trace=trace,
    )
    assert_weights_close(session.w, w_a)
    # The loss checks (every third iteration and the last): the plain Taylor loss of the batch.
    assert sorted(losses) == [2, 5, 8, 11]
    for t, loss in losses.items():
        r = schedule[t].rows
        u = view.x[r] @ trace[t]["w_active"] + joined[r] @ trace[t]["w_passive"]
        y_pm = 2 * view.y[r] - 1
        assert loss == pytest.approx(float(np.log(2) + np.mean(-y_pm * u / 2 + u**2 / 8)), abs=1e-6)
    assert_weights_close(np.asarray(shards["b1"]["weights"]), w_b[:10])
    assert_weights_close(np.asarray(shards["b2"]["weights"]), w_b[10:])
    assert np.linalg.norm(session.w - w0) > 0.05
    b_weights = np.concatenate([np.asarray(shards[n]["weights"]) for n in sorted(SPLIT)])
    u = view.x[scored] @ session.w + joined[scored] @ b_weights
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-u)), atol=1e-6)


def test_a_passive_service_refuses_what_it_does_not_serve_with_peers(tmp_path: Path, breast: BreastSplit) -> None:
    """The first version's limits, one clear refusal each: validation, a
    missing party name, a name used twice."""
    fed = passive_service(tmp_path / "b", split_passive_csv(tmp_path)["b1"])
    c = PassiveClient(fed.services["passive"].address, timeout_s=60)
    try:
        key = BACKEND.generate_keypair(TEST_KEY_BITS)
        pk, fp = c.exchange_keys(key.public, TEST_KEY_BITS)
        rec = align_as_active(c, "align-b", breast.train_ids)
        other = [PartyInfo("b2", BACKEND.generate_keypair(TEST_KEY_BITS).public, 10)]
        rows = rec.positions(breast.train_ids, "ids")
        with pytest.raises(PeerError, match="config.validation_every: not served yet with several passive parties"):
            c.setup_job(
                "j-val",
                CONFIG.model_copy(update={"validation_every": 5}),
                fp,
                10,
                rec.alignment_id,
                rows,
                party_name="b1",
                peers=other,
            )
        with pytest.raises(PeerError, match="spec.party_name: required"):
            c.setup_job("j-name", CONFIG, fp, 10, rec.alignment_id, rows, peers=other)
        with pytest.raises(PeerError, match="distinct names"):
            c.setup_job("j-dup", CONFIG, fp, 10, rec.alignment_id, rows, party_name="b2", peers=other)
    finally:
        c.close()
        fed.stop()
