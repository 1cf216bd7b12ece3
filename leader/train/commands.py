"""`leader train`, `leader export` and `leader embed`.

The functions are plain typer commands; leader/cli.py registers them on the main app
(`register(app)`). `python -m leader.train train ...` runs them without the main CLI, which is also
what `torchrun ... -m leader.train train ...` uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import typer



def train_command(
    config: Path = typer.Option(..., "--config", help="YAML config, e.g. configs/leader-swinb.yaml or configs/demo.yaml."),
    out: Path = typer.Option(..., "--out", help="Run directory: config, checkpoints, metrics, TensorBoard logs."),
    shards: List[str] = typer.Option([], "--shards", help="Shard set (repeatable; one per dataset). Replaces data.shards."),
    cache: List[str] = typer.Option([], "--cache", help="Teacher cache per --shards, in order (default <shards>/cache.zarr)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, e.g. --set optim.lr=1e-4 --set phases.1.epochs=5."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
):
    """Distil the cached teachers into a student, phase by phase (Algorithm 1). Runs under torchrun too."""
    from leader.train.config import load_config
    from leader.train.loop import train

    cfg = load_config(config, set_, shards=shards or None, caches=cache or None)
    summary = train(cfg, out, resume=resume)
    state = "stopped (resume with --resume)" if summary["stopped"] else "finished"
    typer.echo(f"{state} at step {summary['global_step']}: {out}", err=True)


def export_command(
    run: Path = typer.Argument(..., help="Run directory (or checkpoint file) to export."),
    out: Path = typer.Option(..., "--out", help="Directory for model.safetensors, config.json and the heads."),
):
    """Write the student backbone as timm-loadable safetensors plus config, and the heads."""
    from leader.train.export import export_run

    files = export_run(run, out)
    typer.echo("\n".join(str(f) for f in files))


def embed_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Run directory (or checkpoint file)."),
    shards: Path = typer.Option(..., "--shards", help="Shard set to embed (every item: images and patches)."),
    out: Path = typer.Option(..., "--out", help="Output .npz: one array per head, plus rows and keys."),
    heads: str = typer.Option("all", "--heads", help="Comma-separated: backbone and/or teacher names; 'all' for every one."),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
):
    """Embed every item of a shard set with a trained student (backbone and heads)."""
    from leader.train.embed import write_embeddings

    path = write_embeddings(checkpoint, shards, out, heads=None if heads == "all" else heads.split(","),
                            batch_size=batch_size, device=device)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("export")(export_command)
    app.command("embed")(embed_command)


app = typer.Typer(help="Train, export and embed with the LeADER student.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point for `python -m leader.train` (what `torchrun -m leader.train train ...` runs), with
    the main CLI's error handling."""
    from leader.cli import run

    run(app, argv)
