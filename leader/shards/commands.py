"""`leader shards ...`: build a shard set from a dataset, and describe one."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from leader.errors import LeaderError
from leader.runtime import parse_key_values

app = typer.Typer(help="Build and inspect WebDataset shard sets.", no_args_is_help=True)


@app.command()
def build(
    dataset: str = typer.Argument(..., help="Dataset adapter: phantom, csv, nih14, chexpert, ... (see `leader shards datasets`)."),
    out: Path = typer.Option(..., "--out", help="Output directory for shards, keys.txt, rejects.jsonl and manifest.json."),
    root: Optional[Path] = typer.Option(None, "--root", help="The dataset's folder, exactly as distributed."),
    name: Optional[str] = typer.Option(None, "--name", help="The dataset's name in the manifest (default: the adapter's). "
                                       "Two shard sets trained together need two names, e.g. two csv datasets."),
    size: int = typer.Option(512, "--size", help="Long side of the stored images, in pixels."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per shard."),
    workers: int = typer.Option(1, "--workers", help="Decode/resize processes. Output is identical for any value."),
    landmark_splits: str = typer.Option("val,test", "--landmark-splits", help="Splits whose landmarks get landmark "
                                        "patches (comma-separated; they feed the anatomy evaluation only)."),
    landmark_jitter: float = typer.Option(0.0, "--landmark-jitter", help="Move each landmark patch's centre by up to "
                                          "this fraction of its side in x and y (seeded per sample and landmark): "
                                          "a harder anatomy test. 0: centred."),
    landmark_scale: str = typer.Option("1,1", "--landmark-scale", help="LOW,HIGH: scale each landmark patch's side "
                                       "by a seeded factor in this range (e.g. 0.7,1.4). 1,1: 224/1024 of the side."),
    seed: int = typer.Option(0, "--seed", help="Seed for patient-wise splits, healthy patches and the phantom."),
    n: Optional[int] = typer.Option(None, "--n", help="Use only the first N images (phantom: how many to generate)."),
    max_reject_fraction: float = typer.Option(0.01, "--max-reject-fraction", help="Fail the build when more inputs than this are rejected."),
    healthy_ratio: float = typer.Option(1.0, "--healthy-ratio", help="Healthy patches per diseased patch in each split, "
                                        "cut from images the dataset itself calls healthy (0: none)."),
    healthy_max_per_image: int = typer.Option(4, "--healthy-max-per-image", help="When healthy images are too few for "
                                              "the ratio, cut up to this many patches from one; the rest is a reported shortfall."),
    option: list[str] = typer.Option([], "--option", help="Adapter option key=value (repeatable), e.g. --option bits=16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard an existing shard set in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Write a dataset as WebDataset shards with labels, boxes and patch boxes. Resumes when rerun."""
    from leader.progress import progress, rate_text
    from leader.shards.builder import BuildSettings, BuildStopped, build_shards
    from leader.shards.patches import PatchPlan

    if not healthy_ratio >= 0:
        raise LeaderError(f"--healthy-ratio must be 0 or more, got {healthy_ratio}")
    if healthy_max_per_image < 1:
        raise LeaderError(f"--healthy-max-per-image must be at least 1, got {healthy_max_per_image}")
    chosen = tuple(s for s in landmark_splits.split(",") if s)
    if not set(chosen) <= {"train", "val", "test"}:
        raise LeaderError(f"--landmark-splits {landmark_splits!r}: use train, val and test, comma-separated")
    scale = landmark_scale_range(landmark_scale)
    if not 0.0 <= landmark_jitter <= 0.5:
        # Beyond half a side the patch may no longer hold its landmark at all.
        raise LeaderError(f"--landmark-jitter must be between 0 and 0.5 (a fraction of the patch side), got {landmark_jitter}")
    settings = BuildSettings(
        dataset=dataset,
        root=str(root.resolve()) if root else None,
        name=name,
        size=size,
        shard_size=shard_size,
        seed=seed,
        n=n,
        max_reject_fraction=max_reject_fraction,
        patch=PatchPlan(healthy_ratio=healthy_ratio, healthy_max_per_image=healthy_max_per_image,
                        landmark_splits=chosen, landmark_jitter=landmark_jitter, landmark_scale=scale),
        options=parse_key_values(option),
    )
    if root is not None and not root.exists():
        raise LeaderError(f"--root {root} does not exist")
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"shards {dataset}", total=n, rate="")

        def on_progress(done: int, shards: int) -> None:
            bar.update(task, completed=done, rate=f"{rate_text(done, time.perf_counter() - start, 'img')}  {shards} shards")

        try:
            manifest = build_shards(settings, out, workers=workers, overwrite=overwrite, on_progress=on_progress)
        except BuildStopped as stopped:
            # A pre-empted job that saved its state has succeeded at what was asked of it: exit 0.
            typer.echo(str(stopped), err=True)
            return
    summary = summarize(manifest)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
    else:
        print_summary(summary)


def landmark_scale_range(text: str) -> tuple[float, float]:
    """`--landmark-scale LOW,HIGH` -> (LOW, HIGH), both positive and LOW <= HIGH."""
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise LeaderError(f"--landmark-scale {text!r}: give LOW,HIGH, e.g. 0.7,1.4") from None
    if not 0 < low <= high:
        raise LeaderError(f"--landmark-scale {text!r}: need 0 < LOW <= HIGH")
    return low, high


@app.command()
def info(
    shards_dirs: list[Path] = typer.Argument(..., help="One or more shard sets (folders holding manifest.json)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (a list for several sets)."),
):
    """Samples, items, patches, shards, label counts, splits and rejects of a shard set; for several
    sets, one row per dataset: images, diseased and healthy patches, rejected inputs."""
    from leader.shards.manifest import Manifest

    summaries = [summarize(Manifest.load(d)) for d in shards_dirs]
    if as_json:
        typer.echo(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=1))
    elif len(summaries) == 1:
        print_summary(summaries[0])
    else:
        print_comparison(summaries)


@app.command()
def datasets(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List the dataset adapters and what each provides."""
    from leader.shards.datasets import DATASETS, load_all

    load_all()
    import sys

    rows = []
    for name in DATASETS.names():
        factory = DATASETS.get(name)
        doc = factory.__doc__ or sys.modules[factory.__module__].__doc__ or ""
        rows.append({
            "name": name,
            "boxes": bool(getattr(factory, "has_boxes", False)),
            "landmarks": bool(getattr(factory, "has_landmarks", False)),
            "overlap": getattr(factory, "overlap_note", None),
            "about": doc.strip().splitlines()[0] if doc.strip() else "",
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    from leader.progress import console

    table = Table("dataset", "boxes", "landmarks", "about")
    for r in rows:
        table.add_row(r["name"], "yes" if r["boxes"] else "", "yes" if r["landmarks"] else "", r["about"])
    console.print(table)


@app.command()
def grid(
    out: Path = typer.Option(Path("docs/phantom-grid.png"), "--out", help="PNG to write."),
    n: int = typer.Option(12, "--n", help="How many phantom images."),
    seed: int = typer.Option(0, "--seed"),
):
    """Render a grid of phantom radiographs with their boxes and landmarks."""
    from leader.shards.phantom import render_sample_grid

    render_sample_grid(out, n=n, seed=seed)
    typer.echo(str(out))


def summarize(manifest) -> dict:
    from leader.shards.manifest import REJECTS_NAME

    reasons: Counter = Counter()
    rejects_file = manifest.root / REJECTS_NAME
    if rejects_file.exists():
        for line in rejects_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                # The reason's first clause names the kind of problem; details follow a colon.
                reasons[json.loads(line)["reason"].split(":")[0][:80]] += 1
    counts = manifest.counts
    # Shard sets built before the counts existed kept only the patches per kind.
    patch_kinds = ({kind: counts[f"{kind}_patches"] for kind in ("diseased", "healthy", "landmark") if counts[f"{kind}_patches"]}
                   if counts else manifest.extra.get("patch_counts", {}))
    return {
        "path": str(manifest.root),
        "dataset": manifest.dataset,
        "samples": manifest.n_samples,
        "items": manifest.n_items,
        "patches": sum(patch_kinds.values()),
        "patch_kinds": patch_kinds,
        "diseased_patches": patch_kinds.get("diseased", 0),
        "healthy_patches": patch_kinds.get("healthy", 0),
        "healthy_candidates": counts.get("healthy_candidates"),
        "healthy_target": counts.get("healthy_target"),
        "healthy_shortfall": counts.get("healthy_shortfall"),
        "rejected_healthy_candidates": counts.get("rejected_healthy_candidates"),
        "by_split": counts.get("by_split", {}),
        "shards": len(manifest.shards),
        "splits": manifest.splits,
        "labels": manifest.label_counts,
        "landmarks": manifest.landmark_names,
        "rejects": manifest.n_rejects,
        "reject_reasons": dict(reasons.most_common()),
        "size": manifest.build.get("size"),
        "overlap_note": manifest.overlap_note,
        "class_sets": {name: c["names"] for name, c in manifest.class_sets.items()},
        "notes": manifest.notes,
        "mask_classes": manifest.mask_classes,
        "masks": manifest.extra.get("masks"),
    }


def print_summary(summary: dict) -> None:
    from rich.table import Table

    from leader.progress import console

    console.print(
        f"[bold]{summary['dataset']}[/] at {summary['path']}: {summary['samples']} samples, "
        f"{summary['items']} items ({summary['patches']} patches: "
        + ", ".join(f"{v} {k}" for k, v in summary["patch_kinds"].items())
        + f"), {summary['shards']} shards, {summary['rejects']} rejects"
    )
    console.print("splits: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()))
    if summary["labels"]:
        table = Table("label", "pos", "neg", "unknown")
        for name, c in summary["labels"].items():
            table.add_row(name, str(c["pos"]), str(c["neg"]), str(c["unknown"]))
        console.print(table)
    if summary.get("mask_classes"):
        masks = summary["masks"] or {}
        console.print(f"masks: {masks.get('samples', 0)} samples, classes (bit order) "
                      + ", ".join(summary["mask_classes"]) + f"; {masks.get('clipped_polygons', 0)} polygons clipped")
    for reason, count in summary["reject_reasons"].items():
        console.print(f"  rejected {count}: {reason}")
    if summary["healthy_target"] is not None and (summary["healthy_target"] or summary["healthy_candidates"]):
        console.print(f"healthy patches: {summary['healthy_patches']} of the target {summary['healthy_target']} "
                      f"(shortfall {summary['healthy_shortfall']}), from {summary['healthy_candidates']} images the "
                      f"dataset calls healthy ({summary['rejected_healthy_candidates']} more rejected)")
    if summary.get("overlap_note"):
        console.print(f"[yellow]overlap:[/] {summary['overlap_note']}")
    for note in summary["notes"]:
        console.print(f"[yellow]note:[/] {note}")


def print_comparison(summaries: list[dict]) -> None:
    """One row per shard set: the counts to hold against a paper's dataset table."""
    from rich.table import Table

    from leader.progress import console

    table = Table("dataset", "images", "diseased patches", "healthy patches", "healthy candidates", "rejected")
    for s in summaries:
        table.add_row(s["dataset"], str(s["samples"]), str(s["diseased_patches"]), str(s["healthy_patches"]),
                      "" if s["healthy_candidates"] is None else str(s["healthy_candidates"]), str(s["rejects"]))
    console.print(table)
    for s in summaries:
        for note in s["notes"]:
            console.print(f"[yellow]note:[/] {note}")
