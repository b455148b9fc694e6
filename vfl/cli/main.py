"""`vfl`: run a local federation, train, watch, predict."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated

import grpc
import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vfl.cli.client import STATE_NAMES, VflClient
from vfl.cli.federation import LocalFederation, ServiceStartError
from vfl.common.data import load_party_csv, read_id_column
from vfl.common.errors import ConfigError, VflError
from vfl.common.jobconfig import JobConfig, job_config
from vfl.common.serde import config_from_proto
from vfl.common.tls import CLIENT_IDENTITY, DEFAULT_IDENTITIES, TlsConfig, TlsError, TlsFiles, create_certs
from vfl.v1 import client_pb2

app = typer.Typer(help="Vertical federated logistic regression under a two-party Paillier key.", no_args_is_help=True)
console = Console()
# Errors: stderr, and one line whatever the terminal width.
errors = Console(stderr=True, soft_wrap=True)

ROOT = Path(__file__).resolve().parents[2]


def bundled_data_dir() -> Path:
    """The bundled breast split: beside the code in a checkout, or in ./data
    where the package is installed (the container's /app)."""
    for candidate in (ROOT / "data", Path.cwd() / "data"):
        if (candidate / "breast_hetero_guest.csv").is_file():
            return candidate
    return ROOT / "data"


BUNDLED_ACTIVE = bundled_data_dir() / "breast_hetero_guest.csv"
BUNDLED_PASSIVE = bundled_data_dir() / "breast_hetero_host.csv"

Address = Annotated[str, typer.Option("--address", "-a", envvar="VFL_ACTIVE_ADDRESS", help="active party host:port")]
Epochs = Annotated[int, typer.Option(help="passes over the training rows")]
BatchSize = Annotated[int, typer.Option(help="rows per mini-batch (at least 3 * max(p_A, p_B))")]
LearningRate = Annotated[float, typer.Option(help="step size (before --lr-decay)")]
Optimizer = Annotated[
    str, typer.Option(help="each party's update rule: sgd, momentum, nesterov, adagrad, rmsprop or adam")
]
LrDecay = Annotated[str, typer.Option(help="learning-rate schedule: none, step, exponential or inverse_time")]
ConfigSet = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="any other training setting as FIELD=VALUE, repeatable (momentum, beta1, beta2, rho, epsilon, "
        "decay_rate, decay_steps, tol, loss_every, max_iterations, ...)",
    ),
]
L2 = Annotated[float, typer.Option(help="L2 penalty")]
Seed = Annotated[int, typer.Option(help="seed of batch order and initial weights")]
TlsDir = Annotated[
    Path | None,
    typer.Option(
        "--tls-dir", envvar="VFL_TLS_DIR", help="mutual TLS: directory with ca.pem, NAME.pem and NAME.key (vfl certs)"
    ),
]
TlsName = Annotated[str, typer.Option("--tls-name", help="identity whose certificate to present")]
TlsServerName = Annotated[
    str | None, typer.Option("--tls-server-name", help="name the server's certificate must carry (default: the host)")
]
Insecure = Annotated[
    bool,
    typer.Option(
        "--insecure", envvar="VFL_INSECURE", help="plaintext, no TLS (only for services run with VFL_INSECURE=true)"
    ),
]


DpEpsilon = Annotated[
    float,
    typer.Option(
        "--dp-epsilon",
        help="differential privacy: target epsilon of the job (0 = off); each party noises what it decrypts "
        "for the other, and loss checks are off",
    ),
]


def _config(
    epochs: int,
    batch_size: int,
    learning_rate: float,
    l2: float,
    seed: int,
    dp_epsilon: float = 0.0,
    optimizer: str = "sgd",
    lr_decay: str = "none",
    settings: list[str] | None = None,
) -> JobConfig:
    fields: dict[str, object] = {
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "l2": l2,
        "seed": seed,
        "optimizer": optimizer,
        "lr_decay": lr_decay,
    }
    if dp_epsilon:
        # The loss share is not noised: no loss checks under DP.
        fields.update(dp_epsilon=dp_epsilon, loss_every=0)
    for item in settings or []:
        name, sep, value = item.partition("=")
        if not sep or name not in JobConfig.model_fields:
            errors.print(f"[red]error:[/red] --set: expected FIELD=VALUE with a training setting, got {item!r}")
            raise typer.Exit(2)
        fields[name] = value  # pydantic parses the text and names the field if it is not valid
    try:
        return job_config(**fields)
    except VflError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _tls(tls_dir: Path | None, tls_name: str, insecure: bool) -> TlsConfig | None:
    """The client's TLS material from --tls-dir, None with --insecure; exit 2 without either."""
    if tls_dir is not None and insecure:
        errors.print("[red]error:[/red] --tls-dir and --insecure: choose one")
        raise typer.Exit(2)
    if insecure:
        return None
    if tls_dir is None:
        errors.print(
            "[red]error:[/red] give --tls-dir DIR (the CA and this client's certificate, see `vfl certs`), "
            "or --insecure for a plaintext connection to services run with VFL_INSECURE=true"
        )
        raise typer.Exit(2)
    try:
        return TlsConfig.load(TlsFiles.in_dir(tls_dir, tls_name))
    except TlsError as exc:
        errors.print(f"[red]error:[/red] --tls-dir: {exc}")
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _started(fed: LocalFederation) -> Iterator[LocalFederation]:
    """The federation running; a service that cannot start is one line
    (its own config error) and exit code 2, not a traceback."""
    try:
        fed.__enter__()
    except ServiceStartError as exc:
        errors.print(
            f"[red]error:[/red] the {exc.name} service did not start: {exc.reason} (log: {exc.log_path})",
        )
        raise typer.Exit(2) from None
    try:
        yield fed
    finally:
        fed.stop()


def _fail(exc: grpc.RpcError) -> typer.Exit:
    errors.print(f"[red]error {exc.code().name}:[/red] {exc.details()}")
    return typer.Exit(1)


def align_with_report(client: VflClient, ids: Sequence[str] = (), alignment_id: str = "") -> client_pb2.Alignment:
    """Align A's ids with B's by private set intersection; print the sizes."""
    with console.status("aligning ids by private set intersection"):
        done = client.align(ids, alignment_id, include_ids=True)
    if done.state != client_pb2.ALIGNMENT_STATE_SUCCEEDED:
        console.print(f"[red]alignment {done.alignment_id} failed:[/red] {done.error}")
        raise typer.Exit(1)
    console.print(
        f"aligned {done.alignment_id}: {done.size} ids in the intersection "
        f"(active {done.active_size}, passive {done.passive_size}), {done.elapsed_s:.1f} s"
    )
    return done


def train_with_progress(
    client: VflClient,
    config: JobConfig,
    train_ids: list[str],
    job_id: str = "",
    holdout_ids: Sequence[str] = (),
    alignment_id: str = "",
) -> client_pb2.JobStatus:
    """Start a job and show a progress bar fed by the watch stream (aligning
    first if no alignment is named)."""
    if not alignment_id:
        alignment_id = align_with_report(client).alignment_id
    status = client.start_training(config, train_ids, job_id, holdout_ids, alignment_id)
    with Progress(
        TextColumn("[bold]training[/bold] {task.fields[job]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} it"),
        TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        # A's estimate (WatchJob's eta_s), not rich's own: A knows the pace of its iterations.
        TextColumn("eta {task.fields[eta]}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("train", total=status.total_iterations, job=status.job_id, epoch=0, loss="-", eta="-")

        def on_event(ev: client_pb2.JobEvent) -> None:
            loss = f"{ev.loss:.5f}" if ev.HasField("loss") else "-"
            eta = format_eta(ev.eta_s) if ev.HasField("eta_s") else "-"
            progress.update(task, completed=ev.iteration, epoch=ev.epoch, loss=loss, eta=eta)

        final = client.wait(status.job_id, on_event)
    if final.state != client_pb2.JOB_STATE_SUCCEEDED:
        console.print(f"[red]job {final.job_id} {STATE_NAMES[final.state]}:[/red] {final.error}")
        raise typer.Exit(1)
    return final


def format_eta(seconds: float) -> str:
    """'0:42' or '1:02:05'."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def summary(final: client_pb2.JobStatus) -> str:
    loss = f", loss {final.loss:.5f}" if final.HasField("loss") else ""
    eps = f", epsilon spent {final.dp_epsilon_spent:.3g}" if final.HasField("dp_epsilon_spent") else ""
    return f"{final.iteration} iterations{loss}{eps}, {final.elapsed_s:.1f} s"


def read_labels(labels_csv: Path, id_column: str, label_column: str, option: str = "--labels-csv") -> dict[str, float]:
    """The label holder's labels by id, in file order."""
    data = load_party_csv(labels_csv, id_column, label_column, option=option)
    assert data.labels is not None
    return dict(zip(data.ids, data.labels.tolist(), strict=True))


def split_ids(
    labels_csv: Path, id_column: str, label_column: str, test_size: float, split_seed: int, option: str = "--labels-csv"
) -> tuple[list[str], list[str], dict[str, float]]:
    """The split of all the label holder's rows (in file order), and its labels."""
    labels = read_labels(labels_csv, id_column, label_column, option)
    train, test = split_aligned(list(labels), test_size, split_seed)
    return train, test, labels


def split_aligned(ids: Sequence[str], test_size: float, split_seed: int) -> tuple[list[str], list[str]]:
    """scikit-learn's train_test_split over `ids` (the intersection, in the
    label holder's file order: the same split whatever the alignment's order)."""
    from sklearn.model_selection import train_test_split

    try:
        train, test = train_test_split(list(ids), test_size=test_size, random_state=split_seed)
    except ValueError as exc:  # too few rows for the split, or a test size out of range
        raise ConfigError(f"--test-size {test_size:g} of the {len(ids)} aligned ids: {exc}") from None
    return list(train), list(test)


def evaluate_and_report(
    client: VflClient, model_id: str, test_ids: list[str], labels: dict[str, float], started: float
) -> tuple[float, np.ndarray]:
    """Predict the held-out ids, print the confusion matrix and time; return the AUC and the scores."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    probs = client.predict(model_id, test_ids)
    if np.isnan(probs).any():
        raise ConfigError(f"{int(np.isnan(probs).sum())} held-out ids were not scored by the passive party")
    y = np.array([labels[i] for i in test_ids])
    auc = float(roc_auc_score(y, probs))
    cm = confusion_matrix(y, (probs >= 0.5).astype(float), labels=[0.0, 1.0])
    table = Table(title=f"held-out rows: {len(test_ids)} (threshold 0.5)")
    table.add_column("")
    table.add_column("predicted 0", justify="right")
    table.add_column("predicted 1", justify="right")
    table.add_row("actual 0", str(cm[0, 0]), str(cm[0, 1]))
    table.add_row("actual 1", str(cm[1, 0]), str(cm[1, 1]))
    console.print(table)
    console.print(f"accuracy {np.trace(cm) / cm.sum():.4f}   wall time {time.time() - started:.1f} s")
    return auc, probs


# What each party learns, for the report (SECURITY.md has the whole table).
PARTY_LEARNS = [
    (
        "A (active, labels)",
        "Which of its ids B holds, and the size of B's set; its own gradient each iteration; the loss of each "
        "checked batch; p_B; u_A + u_B for each id it scores (hence B's part of the score), within B's budgets.",
    ),
    (
        "B (passive, features)",
        "Which of its ids A holds, and the size of A's set; its own gradient each iteration; the batch row "
        "positions of the agreed schedule; p_A; which positions are trained on and held out; which of its ids "
        "A scores. Never y, A's features, A's weights or any score.",
    ),
    (
        "C (assistant, relay)",
        "Both set sizes and the timing and sizes of the TLS records it relays; no message content (TLS end to end).",
    ),
]


def write_model_report(
    client: VflClient,
    model_id: str,
    labels: dict[str, float],
    out_dir: Path,
    ids: Sequence[str] = (),
    scores: np.ndarray | None = None,
    threshold: float = 0.5,
) -> Path:
    """The model's HTML report in out_dir, on `ids` (default: the model's
    holdout ids), scored now unless `scores` are given; returns index.html."""
    from vfl.cli.report import ReportData, write_report

    detail = client.model(model_id)
    info = detail.info
    ids = list(ids) or list(detail.holdout_ids)
    split = "held-out rows" if ids == list(detail.holdout_ids) else "given ids"
    if not ids:
        raise ConfigError(f"--ids-csv: model {model_id} has no holdout ids; give the ids to evaluate it on")
    unlabelled = [k for k, i in enumerate(ids) if i not in labels]
    if unlabelled:
        raise ConfigError(
            f"--labels-csv: {len(unlabelled)} of the {len(ids)} ids have no label (the first at position "
            f"{unlabelled[0]} of the ids)"
        )
    probs = client.predict(model_id, ids) if scores is None else np.asarray(scores)
    scored = ~np.isnan(probs)
    if not scored.all():
        split += f" ({int((~scored).sum())} not scored by the passive party, left out)"
    kept = [i for i, ok in zip(ids, scored, strict=True) if ok]
    data = ReportData(
        model_id=model_id,
        created_unix=info.created_unix,
        config=config_from_proto(info.config).model_dump(),
        loss_history=[(p.iteration, p.loss) for p in detail.loss_history],
        validation_losses=[(p.iteration, p.loss) for p in detail.validation_losses],
        kept_iteration=detail.kept_iteration if detail.HasField("kept_iteration") else None,
        ids=kept,
        y=np.array([labels[i] for i in kept]),
        scores=probs[scored],
        split_name=split,
        iterations=info.iterations,
        train_rows=info.train_rows,
        active_features=info.active_features,
        passive_features=info.passive_features,
        elapsed_s=detail.elapsed_s,
        phase_seconds=dict(detail.phase_seconds),
        bytes_sent=detail.bytes_sent,
        dp_epsilon_spent=info.dp_epsilon_spent if info.HasField("dp_epsilon_spent") else None,
        dp_delta=detail.dp_delta if detail.HasField("dp_delta") else None,
        learned=PARTY_LEARNS,
        threshold=threshold,
    )
    try:
        return write_report(data, out_dir)
    except ValueError as exc:  # e.g. one class only among the ids
        raise ConfigError(f"--ids-csv: {exc}") from None


def train_and_evaluate(
    address: str,
    config: JobConfig,
    labels: dict[str, float],
    test_size: float,
    split_seed: int,
    started: float,
    wait_s: float,
    tls: TlsFiles | TlsConfig | None = None,
    server_name: str | None = None,
    report_dir: Path | None = None,
) -> float:
    """The demo job: align by PSI, split the intersection, train on the
    training part, predict the held-out part, report (and with report_dir,
    write the HTML report there); returns the AUC."""
    with VflClient(address, tls=tls, server_name=server_name) as client:
        client.wait_ready(wait_s)
        try:
            aligned = align_with_report(client)
            common = set(aligned.ids)
            train_ids, test_ids = split_aligned([i for i in labels if i in common], test_size, split_seed)
            # The held-out ids are the job's holdout: B scores only the model's population.
            final = train_with_progress(
                client, config, train_ids, holdout_ids=test_ids, alignment_id=aligned.alignment_id
            )
            console.print(f"trained {final.job_id}: {summary(final)}")
            auc, probs = evaluate_and_report(client, final.job_id, test_ids, labels, started)
            if report_dir is not None:
                page = write_model_report(client, final.job_id, labels, report_dir, test_ids, probs)
                print(f"report {page}", flush=True)
            print(f"AUC {auc:.4f}", flush=True)  # the last line: scripts read it
            return auc
        except grpc.RpcError as exc:
            raise _fail(exc) from None


@app.command()
def demo(
    active_csv: Annotated[Path, typer.Option(help="label holder's CSV")] = BUNDLED_ACTIVE,
    passive_csv: Annotated[
        list[Path] | None,
        typer.Option(help="feature holder's CSV; repeat it for several passive parties (b1, b2, ...)"),
    ] = None,
    label_column: Annotated[str, typer.Option(help="label column in the active CSV")] = "y",
    id_column: Annotated[str, typer.Option(help="id column in both CSVs")] = "id",
    key_bits: Annotated[int, typer.Option(help="Paillier key size; under 2048 runs in test mode")] = 2048,
    assistant: Annotated[bool, typer.Option(help="route A<->B through the assistant")] = True,
    epochs: Epochs = 5,
    batch_size: BatchSize = 64,
    learning_rate: LearningRate = 0.15,
    l2: L2 = 0.01,
    seed: Seed = 42,
    test_size: Annotated[float, typer.Option(help="held-out fraction")] = 0.2,
    split_seed: Annotated[int, typer.Option(help="random_state of the split")] = 42,
    dp_epsilon: DpEpsilon = 0.0,
    optimizer: Optimizer = "sgd",
    lr_decay: LrDecay = "none",
    setting: ConfigSet = None,
    workdir: Annotated[
        Path | None, typer.Option(help="keys, models, certificates and logs (default: a temporary dir)")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="plaintext gRPC instead of mutual TLS")] = False,
    report_dir: Annotated[Path, typer.Option(help="write the model's HTML report (plots of its quality) here")] = Path(
        "vfl-report"
    ),
) -> None:
    """Start A, B (and C) locally, train, predict the held-out rows, print the AUC, stop.
    Every connection uses mutual TLS with certificates made in WORKDIR/certs, unless --insecure."""
    started = time.time()
    config = _config(epochs, batch_size, learning_rate, l2, seed, dp_epsilon, optimizer, lr_decay, setting)
    try:
        # Both files checked here, with the options' names, before any service starts.
        labels = read_labels(active_csv, id_column, label_column, option="--active-csv")
        passive_csvs = passive_csv or [BUNDLED_PASSIVE]
        for path in passive_csvs:
            load_party_csv(path, id_column, option="--passive-csv")
        if not 0 < test_size < 1:
            raise ConfigError(f"--test-size: expected a fraction between 0 and 1, got {test_size:g}")
    except ConfigError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    parties = {f"b{i + 1}": path for i, path in enumerate(passive_csvs)} if len(passive_csvs) > 1 else {}
    if parties and assistant:
        console.print("assistant off: it tunnels to one passive party, and this run has several")
        assistant = False
    with tempfile.TemporaryDirectory(prefix="vfl-demo-") as tmp:
        root = workdir or Path(tmp)
        console.print(
            f"starting the federation ({key_bits}-bit keys, assistant {'on' if assistant else 'off'}, "
            f"{'PLAINTEXT' if insecure else 'mutual TLS'}) in {root}"
        )
        fed = LocalFederation(
            root,
            active_csv,
            passive_csvs[0],
            key_bits=key_bits,
            assistant=assistant,
            label_column=label_column,
            id_column=id_column,
            tls=not insecure,
            passive_parties=parties,
        )
        with _started(fed):
            console.print("  " + "  ".join(f"{n}={s.address}" for n, s in fed.services.items()))
            train_and_evaluate(
                fed.active_address,
                config,
                labels,
                test_size,
                split_seed,
                started,
                wait_s=60.0,
                tls=fed.tls_files(CLIENT_IDENTITY),
                server_name="active" if fed.tls else None,
                report_dir=report_dir,
            )


@app.command("demo-client")
def demo_client(
    address: Address = "localhost:50051",
    labels_csv: Annotated[
        Path, typer.Option(help="the label holder's CSV (for the split and the AUC)")
    ] = BUNDLED_ACTIVE,
    label_column: Annotated[str, typer.Option()] = "y",
    id_column: Annotated[str, typer.Option()] = "id",
    epochs: Epochs = 5,
    batch_size: BatchSize = 64,
    learning_rate: LearningRate = 0.15,
    l2: L2 = 0.01,
    seed: Seed = 42,
    wait_s: Annotated[float, typer.Option(help="how long to wait for the active party")] = 120.0,
    dp_epsilon: DpEpsilon = 0.0,
    optimizer: Optimizer = "sgd",
    lr_decay: LrDecay = "none",
    setting: ConfigSet = None,
    tls_dir: TlsDir = None,
    tls_name: TlsName = CLIENT_IDENTITY,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
    report_dir: Annotated[Path | None, typer.Option(help="also write the model's HTML report here")] = None,
) -> None:
    """Against running services: train on 80 %, predict the held-out 20 %, print the AUC."""
    started = time.time()
    tls = _tls(tls_dir, tls_name, insecure)
    config = _config(epochs, batch_size, learning_rate, l2, seed, dp_epsilon, optimizer, lr_decay, setting)
    labels = read_labels(labels_csv, id_column, label_column)
    train_and_evaluate(address, config, labels, 0.2, 42, started, wait_s, tls, tls_server_name, report_dir)


@app.command()
def train(
    address: Address = "localhost:50051",
    epochs: Epochs = 5,
    batch_size: BatchSize = 64,
    learning_rate: LearningRate = 0.15,
    l2: L2 = 0.01,
    seed: Seed = 42,
    job_id: Annotated[str, typer.Option(help="job id (generated if empty)")] = "",
    ids_csv: Annotated[
        Path | None, typer.Option(help="CSV whose id column lists the training rows (default: all)")
    ] = None,
    holdout_ids_csv: Annotated[
        Path | None,
        typer.Option(
            help="CSV whose id column lists ids to score later but not train on (B scores only these "
            "and the training ids, by default)"
        ),
    ] = None,
    id_column: Annotated[str, typer.Option()] = "id",
    alignment_id: Annotated[
        str, typer.Option(help="the alignment to train on (vfl align); empty: align all of A's ids first")
    ] = "",
    dp_epsilon: DpEpsilon = 0.0,
    model: Annotated[
        str, typer.Option(help="logistic (P(y = 1)) or linear (regression on numeric labels)")
    ] = "logistic",
    optimizer: Optimizer = "sgd",
    lr_decay: LrDecay = "none",
    setting: ConfigSet = None,
    tls_dir: TlsDir = None,
    tls_name: TlsName = CLIENT_IDENTITY,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
) -> None:
    """Train a model with running services; shows progress and the final status."""
    tls = _tls(tls_dir, tls_name, insecure)
    config = _config(
        epochs,
        batch_size,
        learning_rate,
        l2,
        seed,
        dp_epsilon,
        optimizer,
        lr_decay,
        [f"model={model}", *(setting or [])],
    )
    ids = _read_ids(ids_csv, id_column, "--ids-csv") if ids_csv else []
    holdout = _read_ids(holdout_ids_csv, id_column, "--holdout-ids-csv") if holdout_ids_csv else []
    with VflClient(address, tls=tls, server_name=tls_server_name) as client:
        try:
            final = train_with_progress(client, config, ids, job_id, holdout, alignment_id)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    console.print(f"model {final.job_id}: {summary(final)}")


@app.command()
def status(
    job_id: str,
    address: Address = "localhost:50051",
    tls_dir: TlsDir = None,
    tls_name: TlsName = CLIENT_IDENTITY,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
) -> None:
    """Status of a job."""
    tls = _tls(tls_dir, tls_name, insecure)
    with VflClient(address, tls=tls, server_name=tls_server_name) as client:
        try:
            st = client.status(job_id)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    loss = f"{st.loss:.5f}" if st.HasField("loss") else "-"
    eta = f"  eta {format_eta(st.eta_s)}" if st.HasField("eta_s") else ""
    console.print(
        f"{st.job_id}: {STATE_NAMES[st.state]}  iteration {st.iteration}/{st.total_iterations}  "
        f"epoch {st.epoch}  loss {loss}  {st.elapsed_s:.1f} s{eta} {st.error}"
    )


@app.command()
def report(
    model_id: str,
    out: Annotated[Path, typer.Option("--out", help="directory to write index.html and its plots to")],
    address: Address = "localhost:50051",
    ids_csv: Annotated[
        Path | None, typer.Option(help="CSV whose id column lists the ids to evaluate on (default: the holdout ids)")
    ] = None,
    labels_csv: Annotated[
        Path, typer.Option(help="the label holder's CSV (A's data: ids and labels)")
    ] = BUNDLED_ACTIVE,
    label_column: Annotated[str, typer.Option()] = "y",
    id_column: Annotated[str, typer.Option()] = "id",
    threshold: Annotated[float, typer.Option(help="score threshold of the confusion matrix")] = 0.5,
    tls_dir: TlsDir = None,
    tls_name: TlsName = CLIENT_IDENTITY,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
) -> None:
    """A model's report at A (which alone holds the labels): an HTML page with
    loss, ROC, KS, lift and gain, score distributions, confusion matrix,
    calibration, configuration, timings, bytes, epsilon and what each party learned."""
    tls = _tls(tls_dir, tls_name, insecure)
    if not 0 < threshold < 1:
        errors.print(f"[red]error:[/red] --threshold: expected a number between 0 and 1, got {threshold:g}")
        raise typer.Exit(2)
    try:
        labels = read_labels(labels_csv, id_column, label_column)
    except ConfigError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    ids = _read_ids(ids_csv, id_column, "--ids-csv") if ids_csv else []
    with VflClient(address, tls=tls, server_name=tls_server_name) as client:
        try:
            page = write_model_report(client, model_id, labels, out, ids, threshold=threshold)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        except ConfigError as exc:
            errors.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
    print(f"report {page}", flush=True)


@app.command()
def cancel(
    job_id: str,
    address: Address = "localhost:50051",
    tls_dir: TlsDir = None,
    tls_name: TlsName = CLIENT_IDENTITY,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
) -> None:
    """Stop a running job: both parties drop it and store nothing."""
    tls = _tls(tls_dir, tls_name, insecure)
    with VflClient(address, tls=tls, server_name=tls_server_name) as client:
        try:
            st = client.cancel(job_id)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    console.print(f"{st.job_id}: {STATE_NAMES[st.state]} at iteration {st.iteration}/{st.total_iterations}")


@app.command()
def jobs(
    address: Address = "localhost:50051",
    tls_dir: TlsDir = None,
    tls_name: TlsName = CLIENT_IDENTITY,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
) -> None:
    """Running and finished jobs at the active party (since it started)."""
    tls = _tls(tls_dir, tls_name, insecure)
    with VflClient(address, tls=tls, server_name=tls_server_name) as client:
        try:
            infos = client.list_jobs()
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    table = Table("job", "state", "iteration", "epoch", "loss", "seconds", "eta", "AUC", "KS", "error")
    for j in infos:
        table.add_row(
            j.job_id,
            STATE_NAMES[j.state],
            f"{j.iteration}/{j.total_iterations}",
            str(j.epoch),
            f"{j.loss:.5f}" if j.HasField("loss") else "-",
            f"{j.elapsed_s:.1f}",
            format_eta(j.eta_s) if j.HasField("eta_s") else "-",
            f"{j.validation_auc:.4f}" if j.HasField("validation_auc") else "-",
            f"{j.validation_ks:.4f}" if j.HasField("validation_ks") else "-",
            j.error,
        )
    console.print(table)


@app.command()
def predict(
    model_id: str,
    ids_csv: Annotated[Path, typer.Option(help="CSV with an id column")],
    address: Address = "localhost:50051",
    id_column: Annotated[str, typer.Option()] = "id",
    out: Annotated[Path | None, typer.Option(help="write id,probability,status here (default: stdout)")] = None,
    align_new_ids: Annotated[
        bool, typer.Option(help="align ids outside the model's alignment by a new PSI (if B scores any id)")
    ] = False,
    tls_dir: TlsDir = None,
    tls_name: TlsName = CLIENT_IDENTITY,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
) -> None:
    """Score the ids of a CSV with a trained model."""
    tls = _tls(tls_dir, tls_name, insecure)
    ids = _read_ids(ids_csv, id_column, "--ids-csv")
    with VflClient(address, tls=tls, server_name=tls_server_name) as client:
        try:
            reply = client.predict_reply(model_id, ids, align_new_ids)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    rows = zip(ids, reply.probabilities, reply.status, strict=True)
    lines = [
        "id,probability,status",
        *(
            f"{i},{p:.6f},scored" if s == client_pb2.PREDICTION_STATUS_SCORED else f"{i},,not_at_passive"
            for i, p, s in rows
        ),
    ]
    if out is None:
        print("\n".join(lines))
    else:
        out.write_text("\n".join(lines) + "\n")
        console.print(f"wrote {len(ids)} predictions to {out}")


@app.command()
def align(
    address: Address = "localhost:50051",
    ids_csv: Annotated[
        Path | None, typer.Option(help="CSV whose id column lists A's ids to align (default: all of A's ids)")
    ] = None,
    id_column: Annotated[str, typer.Option()] = "id",
    alignment_id: Annotated[str, typer.Option(help="alignment id (generated if empty)")] = "",
    out: Annotated[Path | None, typer.Option(help="write A's ids in the intersection here, one per line")] = None,
    tls_dir: TlsDir = None,
    tls_name: TlsName = CLIENT_IDENTITY,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
) -> None:
    """Align A's ids with B's by private set intersection; print its id and sizes."""
    tls = _tls(tls_dir, tls_name, insecure)
    ids = _read_ids(ids_csv, id_column, "--ids-csv") if ids_csv else []
    with VflClient(address, tls=tls, server_name=tls_server_name) as client:
        try:
            done = align_with_report(client, ids, alignment_id)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    if out is not None:
        out.write_text("".join(f"{i}\n" for i in done.ids))
        console.print(f"wrote {done.size} ids to {out}")


@app.command()
def alignments(
    address: Address = "localhost:50051",
    tls_dir: TlsDir = None,
    tls_name: TlsName = CLIENT_IDENTITY,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
) -> None:
    """Alignments held by the active party."""
    tls = _tls(tls_dir, tls_name, insecure)
    with VflClient(address, tls=tls, server_name=tls_server_name) as client:
        try:
            infos = client.list_alignments()
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    table = Table("alignment", "state", "size", "active", "passive", "seconds")
    for a in infos:
        state = client_pb2.AlignmentState.Name(a.state).removeprefix("ALIGNMENT_STATE_").lower()
        table.add_row(a.alignment_id, state, str(a.size), str(a.active_size), str(a.passive_size), f"{a.elapsed_s:.1f}")
    console.print(table)


@app.command()
def models(
    address: Address = "localhost:50051",
    tls_dir: TlsDir = None,
    tls_name: TlsName = CLIENT_IDENTITY,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
) -> None:
    """Models stored at the active party."""
    tls = _tls(tls_dir, tls_name, insecure)
    with VflClient(address, tls=tls, server_name=tls_server_name) as client:
        try:
            infos = client.list_models()
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    table = Table("model", "rows", "p_A", "p_B", "iterations", "final loss", "holdout", "AUC", "KS")
    for m in infos:
        table.add_row(
            m.model_id,
            str(m.train_rows),
            str(m.active_features),
            str(m.passive_features),
            str(m.iterations),
            f"{m.final_loss:.5f}" if m.HasField("final_loss") else "-",
            str(m.holdout_rows),
            f"{m.validation_auc:.4f}" if m.HasField("validation_auc") else "-",
            f"{m.validation_ks:.4f}" if m.HasField("validation_ks") else "-",
        )
    console.print(table)


@app.command()
def certs(
    out: Annotated[Path, typer.Option("--out", help="directory to write (mode 700; keys mode 600)")] = Path("certs"),
    names: Annotated[
        list[str] | None,
        typer.Option("--names", help="extra client identities (repeat the option or separate with commas)"),
    ] = None,
    services: Annotated[
        list[str] | None,
        typer.Option(
            "--services", help="extra service identities, e.g. passive parties b1,b2 of VFL_PEERS (server and client)"
        ),
    ] = None,
) -> None:
    """Create a CA and a certificate and key for each of active, passive,
    assistant and client (and any --names), and the relay token A presents
    to the assistant, in OUT; existing ones are kept."""
    extra = [n.strip() for item in names or [] for n in item.split(",") if n.strip()]
    more_services = [n.strip() for item in services or [] for n in item.split(",") if n.strip()]
    extra += more_services
    try:
        created = create_certs(out, extra, more_services)
    except (TlsError, OSError) as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    kept = [n for n in dict.fromkeys([*DEFAULT_IDENTITIES, *extra]) if n not in created]
    # Plain print: one line, not wrapped to the terminal.
    print(
        f"{out}: CA ca.pem; created {', '.join(created) or 'none'}; kept {', '.join(kept) or 'none'}; "
        "relay token relay.token"
    )


def _read_ids(path: Path, id_column: str, option: str) -> list[str]:
    try:
        return read_id_column(path, id_column, option)
    except ConfigError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
