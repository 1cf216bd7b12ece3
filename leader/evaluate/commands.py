"""`leader eval ...` and `leader report`, and the evaluation protocols each command runs.

`eval_app` is a typer sub-app (linear-probe, retrieval, anatomy, finetune, compare); leader/cli.py
adds it as `leader eval` and registers `report_command` as `leader report`. Each eval command
writes metrics.json and its figures into --out and prints the headline number. Beside each command
stands the registration of the protocol(s) it runs (`leader/evaluate/protocols.py`): the list that
the report's columns and order iterate.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from leader.errors import LeaderError
from leader.evaluate.protocols import WEIGHTS, Protocol, register_protocol
from leader.progress import progress

eval_app = typer.Typer(help="Evaluate representations: linear probe, retrieval, anatomy, fine-tuning, compare.",
                       no_args_is_help=True)

SHARDS = typer.Option(..., "--shards", help="Shard set to evaluate on (its train/val/test splits are used).")
CACHE = typer.Option(None, "--cache", help="Teacher cache for teacher: representations (default <shards>/cache.zarr).")
DEVICE = typer.Option("cpu", "--device", help="Device for run: representations and fine-tuning (cpu, cuda).")
REPR_HELP = "Representation: run:RUN[:disease|:anatomy], teacher:NAME or concat:A+B."


def parse_fractions(values: list[str]) -> list[float]:
    """--fraction 0.01 --fraction 0.1, or --fraction 0.01,0.1,1.0."""
    fractions = []
    for value in values:
        for part in value.split(","):
            try:
                fractions.append(float(part))
            except ValueError:
                raise LeaderError(f"--fraction {part!r} is not a number") from None
    return fractions or [1.0]


def _done(metrics: dict, out: Path, started: float) -> None:
    primary = metrics["primary"]
    typer.echo(f"{metrics['protocol']} {metrics['representation']}: {primary} = {metrics[primary]:.4f} "
               f"({time.perf_counter() - started:.1f} s) -> {out / 'metrics.json'}")


LINEAR_PROBE = register_protocol(Protocol(
    "linear-probe", "linear-probe", "leader.evaluate.linear_probe:run_linear_probe", "image-level linear probe",
    secondary=("auc_std",), representations="many"))
LESION_PROBE = register_protocol(Protocol(
    "linear-probe-lesion", "linear-probe", "leader.evaluate.linear_probe:run_linear_probe", "lesion-level linear probe",
    secondary=("auc_std",), options={"level": "lesion"}, representations="many"))
FINETUNE = register_protocol(Protocol(
    "finetune", "finetune", "leader.evaluate.finetune:run_finetune", "full fine-tuning", secondary=("auc_std",),
    inputs=WEIGHTS))
RETRIEVAL = register_protocol(Protocol(
    "retrieval", "retrieval", "leader.evaluate.retrieval:run_retrieval", "zero-shot disease retrieval",
    secondary=("precision_at_k_std", "k", "n_queries", "chance")))
ANATOMY = register_protocol(Protocol(
    "anatomy", "anatomy", "leader.evaluate.anatomy:run_anatomy", "zero-shot anatomy (landmarks)",
    secondary=("nmi", "silhouette", "knn_accuracy_std", "chance")))


@eval_app.command("linear-probe")
def linear_probe_command(
    shards: Path = SHARDS,
    repr_: List[str] = typer.Option(..., "--repr", help=REPR_HELP + " Repeat with --ensemble average."),
    out: Path = typer.Option(..., "--out", help="Directory for metrics.json and auc_per_class.png."),
    level: str = typer.Option("image", "--level", help="image: image labels; lesion: box crops by lesion class."),
    fraction: List[str] = typer.Option(["1.0"], "--fraction", help="Training-label fractions (repeat or comma-separate)."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds (each draws its own training subset)."),
    ensemble: Optional[str] = typer.Option(None, "--ensemble", help="average: average the probes of several --repr."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples of the test set for the 95% CI."),
    cache: Optional[Path] = CACHE,
    device: str = DEVICE,
):
    """Logistic probes per class on frozen features; L2 strength chosen on val, AUC on test."""
    fractions = parse_fractions(fraction)
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("linear probe fits", total=len(fractions) * seeds, rate="")
        metrics = LINEAR_PROBE(shards, repr_, out, level=level, fractions=fractions, seeds=seeds,
                               ensemble=ensemble, cache=cache, device=device, n_boot=n_boot,
                               on_fit=lambda: bar.advance(task))
    _done(metrics, out, started)


@eval_app.command("retrieval")
def retrieval_command(
    shards: Path = SHARDS,
    repr_: str = typer.Option(..., "--repr", help=REPR_HELP),
    out: Path = typer.Option(..., "--out", help="Directory for metrics.json and retrieval_grid.png."),
    k: int = typer.Option(100, "--k", help="Precision@K (capped per query at its number of relevant images)."),
    queries: int = typer.Option(500, "--queries", help="Random diseased-patch queries (all when fewer exist)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the query draw."),
    cache: Optional[Path] = CACHE,
    device: str = DEVICE,
):
    """Zero-shot retrieval: diseased test patches query the test images by cosine similarity."""
    started = time.perf_counter()
    metrics = RETRIEVAL(shards, [repr_], out, k=k, n_queries=queries, seed=seed, cache=cache, device=device)
    _done(metrics, out, started)


@eval_app.command("anatomy")
def anatomy_command(
    shards: Path = SHARDS,
    repr_: str = typer.Option(..., "--repr", help=REPR_HELP),
    out: Path = typer.Option(..., "--out", help="Directory for metrics.json and tsne_landmarks.png."),
    k: int = typer.Option(10, "--k", help="Neighbours of the kNN vote."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds, grouped by patient."),
    seed: int = typer.Option(0, "--seed", help="Seed of k-means and t-SNE."),
    cache: Optional[Path] = CACHE,
    device: str = DEVICE,
):
    """Zero-shot anatomy on landmark patches: kNN accuracy, k-means NMI, silhouette, t-SNE."""
    started = time.perf_counter()
    metrics = ANATOMY(shards, [repr_], out, k=k, n_folds=folds, seed=seed, cache=cache, device=device)
    _done(metrics, out, started)


@eval_app.command("finetune")
def finetune_command(
    shards: Path = SHARDS,
    repr_: str = typer.Option(..., "--repr", help="run:RUN (the student's backbone) or timm:ARCH[:CHECKPOINT]."),
    out: Path = typer.Option(..., "--out", help="Directory for metrics.json and auc_per_class.png."),
    fraction: List[str] = typer.Option(["1.0"], "--fraction", help="Training-label fractions (repeat or comma-separate)."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds (initialisation of the head, data order, subset)."),
    epochs: int = typer.Option(20, "--epochs", help="Maximum epochs."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per step."),
    lr: float = typer.Option(1e-4, "--lr", help="Backbone learning rate (the head uses 10x)."),
    patience: int = typer.Option(5, "--patience", help="Stop after this many epochs without a better val AUC."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size (default: the run's, or 224)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random views of the training images."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples of the test set for the 95% CI."),
    device: str = DEVICE,
):
    """Full fine-tuning of a backbone with a linear head on the image labels (AdamW, cosine, early stopping)."""
    fractions = parse_fractions(fraction)
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("fine-tuning epochs", total=len(fractions) * seeds * epochs, rate="")
        metrics = FINETUNE(shards, [repr_], out, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
                           augment=augment, fractions=fractions, seeds=seeds, image_size=image_size,
                           device=device, n_boot=n_boot, on_epoch=lambda n: bar.advance(task, n))
    _done(metrics, out, started)


@eval_app.command("compare")
def compare_command(
    a: Path = typer.Argument(..., help="metrics.json (or its directory) of representation A."),
    b: Path = typer.Argument(..., help="metrics.json (or its directory) of representation B, same protocol."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
):
    """Two-sample t-test (scipy ttest_ind) on the primary metric across seeds, folds or queries."""
    from leader.evaluate.compare import compare_files

    result = compare_files(a, b, alpha)
    typer.echo(json.dumps(result.to_dict(), indent=1) if as_json else result.sentence())


def report_command(
    dirs: List[Path] = typer.Argument(..., help="Directories holding metrics.json files (searched recursively)."),
    out: Path = typer.Option(Path("report.md"), "--out", help="The markdown report to write."),
    claims: Optional[Path] = typer.Option(None, "--claims", help="YAML/JSON list of claims to mark PASS or FAIL."),
    strict: bool = typer.Option(False, "--strict", help="Exit with status 1 when a claim fails."),
):
    """Tables (representations x protocols) with CIs, significance and figures; claims marked PASS/FAIL."""
    from leader.evaluate.claims import load_claims
    from leader.evaluate.report import write_report

    _, verdicts = write_report(dirs, out, load_claims(claims) if claims else None)
    for verdict in verdicts:
        typer.echo(verdict.line())
    typer.echo(f"report: {out}")
    if strict and not all(v.passed for v in verdicts):
        raise typer.Exit(1)
