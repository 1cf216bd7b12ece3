"""`leader precompute ...` and `leader cache ...`: fill the teacher cache, audit a teacher, inspect a cache.

    leader precompute --teacher anatomy --shards shards/phantom --model adam.pth --views 4
    leader precompute audit --teacher anatomy --shards shards/phantom --model adam.pth
    leader cache info shards/phantom/cache.zarr
    leader cache verify shards/phantom/cache.zarr --shards shards/phantom
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Optional

import typer

from leader.errors import LeaderError
from leader.runtime import parse_key_values

precompute_app = typer.Typer(
    help="Run a teacher once over every item of a shard set into the Zarr teacher cache (resumable; "
         "RANK/WORLD_SIZE split the shards between processes).")
cache_app = typer.Typer(help="Inspect and verify a teacher-embedding cache.", no_args_is_help=True)


TRUST_HELP = ("Load a cxr-foundation SavedModel even though its graph holds file-system, Python-call or "
              "network ops (only for a model whose source you trust).")


def _default_cache(shards: Path, cache: Optional[str]) -> str:
    from leader.shards.layout import default_cache_path

    return cache if cache else str(default_cache_path(shards))


def _teacher_options(pairs: list[str], trust_model: bool) -> dict:
    """--option pairs, plus trust_model when --trust-model is given (the cxr-foundation teacher's option)."""
    options = parse_key_values(pairs)
    if trust_model:
        options["trust_model"] = True
    return options


@precompute_app.callback(invoke_without_command=True)
def precompute_command(
    ctx: typer.Context,
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher role/name: disease, anatomy or any name (with --kind)."),
    shards: Optional[Path] = typer.Option(None, "--shards", help="The shard set (folder with manifest.json)."),
    cache: Optional[str] = typer.Option(None, "--cache", help="The cache store (default: SHARDS/cache.zarr); a path or URL."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Teacher kind (default: disease -> cxr-foundation, anatomy -> adam)."),
    model: Optional[str] = typer.Option(None, "--model", help="Weights: a checkpoint file, SavedModel or embeddings folder."),
    views: int = typer.Option(4, "--views", help="Views per item (view 0 is the identity)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Views per teacher call."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N (cuda takes LOCAL_RANK under torchrun)."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored embedding type: float16 or float32."),
    option: list[str] = typer.Option([], "--option", help="Teacher option key=value (repeatable), e.g. --option arch=resnet50."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with teachers: {NAME: {kind, model, options}}."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a model given as a URL or hub handle."),
    seed: int = typer.Option(0, "--seed", help="Seed of the view parameters."),
    patch_size: int = typer.Option(224, "--patch-size", help="Side at which patches are cut before their views are rendered."),
    view: list[str] = typer.Option([], "--view", help="A view range key=value (repeatable), e.g. --view rotation_deg=10 "
                                   "--view brightness=0.2; the rest keep ViewSpec's defaults. Every teacher of one cache "
                                   "must use the same ranges."),
    overwrite_teacher: bool = typer.Option(False, "--overwrite-teacher", help="Replace this teacher's embeddings if they came from other weights or settings."),
    decode_threads: Optional[int] = typer.Option(None, "--decode-threads", help="Threads decoding the next images while the teacher runs (default: one per CPU, up to 8; 0: none)."),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    repair: bool = typer.Option(False, "--repair", help="First reset the shards of this teacher whose chunks fail their "
                                "checksum (or hold NaN/Inf), then recompute just those (one process only)."),
):
    """Compute one teacher's embeddings for every item and view into the cache. Rerun to resume."""
    if ctx.invoked_subcommand is not None:
        return
    if teacher is None or shards is None:
        raise LeaderError("leader precompute needs --teacher NAME and --shards DIR (see leader precompute --help)")
    from leader.precompute.run import CacheLayout, Execution, missing_summary, precompute, resolve_teacher
    from leader.precompute.teachers import create_teacher
    from leader.progress import progress, rate_text
    from leader.runtime import local_device

    cache_path = _default_cache(shards, cache)
    from leader.views import ViewSpec

    layout = CacheLayout(views=views, seed=seed, patch_size=patch_size, dtype=dtype,
                         view_spec=ViewSpec.from_dict(parse_key_values(view, "--view")))
    execution = Execution(batch_size=batch_size, device=device, decode_threads=decode_threads)
    choice = resolve_teacher(teacher, kind, model, _teacher_options(option, trust_model), config)
    repairing = _repaired(cache_path, shards, teacher) if repair else contextlib.nullcontext()
    start = time.perf_counter()
    with repairing, progress() as bar, create_teacher(choice.kind, model=choice.model, device=local_device(device),
                                                      allow_remote=allow_remote, **choice.options) as loaded:
        task = bar.add_task(f"precompute {teacher}", total=None, rate="")

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, rate=rate_text(done, time.perf_counter() - start, "items"))

        result = precompute(shards, teacher, loaded, cache_path, layout, execution,
                            overwrite_teacher=overwrite_teacher, on_progress=on_progress)
    where = f" (rank {result.rank} of {result.world_size})" if result.world_size > 1 else ""
    typer.echo(f"{teacher}{where}: {len(result.shards_computed)} shards, {result.items} items, {result.views} views "
               f"in {result.seconds:.1f} s ({result.items_per_second:,.1f} items/s); "
               f"{len(result.shards_skipped)} shards were already done")
    if result.missing is not None and result.missing["items"]:
        typer.echo(missing_summary(teacher, result.missing, result.items))
    if result.interrupted:
        typer.echo(f"stopped on SIGTERM after shard {result.shards_computed[-1]}; rerun the same command to resume")
    elif result.complete:
        typer.echo(f"teacher {teacher!r} is complete in {cache_path}")
    else:
        typer.echo(f"this rank's shards are done; teacher {teacher!r} completes when the other ranks finish")


@contextlib.contextmanager
def _repaired(cache_path: str, shards: Path, teacher: str):
    """--repair: reset what fails verification, then hold the teacher's writer lock through the
    precompute that recomputes it, so that no other writer starts in between."""
    from leader.precompute.cache import TeacherCache, repair_teacher
    from leader.precompute.locks import teacher_writer
    from leader.runtime import torchrun_position
    from leader.shards.manifest import Manifest

    if torchrun_position().world_size > 1:
        raise LeaderError("--repair runs in one process, but RANK/WORLD_SIZE are set; it recomputes only the "
                          "damaged shards, so one process is enough")
    with teacher_writer(cache_path, teacher, 0, 1):
        report = repair_teacher(TeacherCache.open(cache_path, mode="r+"), Manifest.load(shards), teacher)
        for d in report.damaged:
            typer.echo(f"repair: chunk {d.file} ({d.array}, rows {d.rows[0]}-{d.rows[1]}) is damaged: {d.reason}")
        if report.shared_rewritten:
            typer.echo("repair: the shared arrays (items, views) were written again from the shards")
        if report.nonfinite_shards:
            typer.echo(f"repair: shards {', '.join(map(str, report.nonfinite_shards))} hold NaN/Inf embeddings")
        if report.shards_reset:
            typer.echo(f"repair: teacher {teacher!r}: shards {', '.join(map(str, report.shards_reset))} will be recomputed")
        elif not report.damaged:
            typer.echo(f"repair: nothing of teacher {teacher!r} fails verification")
        if report.unchecked:
            typer.echo(f"repair: note: {', '.join(report.unchecked)} carry no checksums (written before leader added "
                       "them): there only chunks that fail to decode and NaN/Inf rows can be found")
        yield


@precompute_app.command("audit")
def audit_command(
    teacher: str = typer.Option(..., "--teacher", help="Teacher role/name."),
    shards: Path = typer.Option(..., "--shards", help="The shard set to draw images from."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Teacher kind (default from the role)."),
    model: Optional[str] = typer.Option(None, "--model", help="Teacher weights."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Cache whose view spec to use and where to store the result (default SHARDS/cache.zarr, if it exists)."),
    n_items: int = typer.Option(64, "--n-items", help="Images to audit (the first ones in manifest order)."),
    views: int = typer.Option(4, "--views", help="Views per family and image, the identity included."),
    threshold: float = typer.Option(0.9, "--threshold", help="Mean cosine at which a family counts as teacher-consistent."),
    batch_size: int = typer.Option(32, "--batch-size", help="Views per teacher call."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    option: list[str] = typer.Option([], "--option", help="Teacher option key=value (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with teachers: {NAME: {kind, model, options}}."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a model given as a URL or hub handle."),
    seed: int = typer.Option(0, "--seed", help="Seed of the view parameters (a cache's own seed wins)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
):
    """Measure how far each augmentation family moves the teacher's embedding (cosine to the identity view)."""
    from leader.precompute.audit import audit_invariance, format_audit
    from leader.precompute.cache import TeacherCache, local_store_path
    from leader.precompute.run import resolve_teacher
    from leader.precompute.teachers import create_teacher
    from leader.views import ViewSpec

    cache_path = _default_cache(shards, cache)
    local = local_store_path(cache_path)
    store = None
    if cache is not None or (local is not None and (local / "zarr.json").exists()):
        store = TeacherCache.open(cache_path, mode="r+")
    spec, seed = (store.view_spec, store.seed) if store is not None else (ViewSpec(), seed)
    choice = resolve_teacher(teacher, kind, model, _teacher_options(option, trust_model), config)
    with create_teacher(choice.kind, model=choice.model, device=device, allow_remote=allow_remote, **choice.options) as t:
        result = audit_invariance(shards, t, name=teacher, n_items=n_items, n_views=views, threshold=threshold,
                                  seed=seed, view_spec=spec, batch_size=batch_size, device=device)
    stored_note = "no cache found; the result is not stored"
    if store is not None:
        if teacher not in store.teachers:
            stored_note = f"teacher {teacher!r} is not in cache {cache_path} yet; the result is not stored"
        elif store.teacher_attrs(teacher).get("fingerprint") != result["fingerprint"]:
            stored_note = (f"teacher {teacher!r} in cache {cache_path} was computed with other weights; "
                           "the result is not stored")
        else:
            store.update_teacher_attrs(teacher, {"audit": result})
            stored_note = f"stored in {cache_path} (teachers/{teacher} attrs 'audit')"
    result = {**result, "stored": stored_note}
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        typer.echo(format_audit(result))
        typer.echo(stored_note)


@cache_app.command("info")
def info_command(
    path: str = typer.Argument(..., help="The cache store (DIR.zarr or URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Teachers, dimensions, views, progress, size and compression of a cache."""
    from leader.precompute.cache import TeacherCache

    summary = TeacherCache.open(path).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    typer.echo(f"{summary['path']}: {summary['n_items']} items in {summary['n_shards']} shards, "
               f"{summary['n_views']} views per item, seed {summary['seed']}, patch size {summary['patch_size']}, "
               + ("CRC32C checksums on every chunk" if summary["checksums"] else "shared arrays with no checksums"))
    if not summary["teachers"]:
        typer.echo("no teachers yet")
    for name, t in summary["teachers"].items():
        ratio = f"{t['compression_ratio']:.2f}x" if t["compression_ratio"] else "-"
        typer.echo(f"  {name:<12} {t['kind']:<22} dim {t['dim']:<5} views {t['views']} {t['dtype']:<8} "
                   f"done {t['done_shards']}/{t['n_shards']} ({100 * t['done_fraction']:.0f}%)  "
                   f"{_human_bytes(t['bytes_stored'])} stored, compression {ratio}  "
                   f"weights sha256 {str(t['fingerprint'])[:12]}")
        if not t["checksums"]:
            typer.echo(f"    no checksums on {', '.join(t['unchecked_arrays'])} (written before leader added them); "
                       "a flipped bit there can decode to wrong values unseen")
        if t["missing"] and t["missing"].get("summary"):
            typer.echo(f"    {t['missing']['summary']}")
        if t["audit"] is not None:
            typer.echo(f"    audit: teacher-consistent families: {', '.join(t['audit']) or 'none'}")


@cache_app.command("verify")
def verify_command(
    path: str = typer.Argument(..., help="The cache store (DIR.zarr or URL)."),
    shards: Path = typer.Option(..., "--shards", help="The shard set the cache belongs to."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="With --model: the teacher whose weights to check."),
    model: Optional[str] = typer.Option(None, "--model", help="Recompute this model's weights fingerprint and compare."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Teacher kind for --model (default: the cache's)."),
    option: list[str] = typer.Option([], "--option", help="Teacher option key=value for --model (repeatable)."),
    trust_model: bool = typer.Option(False, "--trust-model", help=TRUST_HELP),
    deep: bool = typer.Option(False, "--deep", help="Read every chunk of every array and name each damaged chunk file."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Check a cache against its shards: keys, done flags, NaN/Inf rows, shapes, fingerprints, chunk checksums
    (all of them with --deep). Exit 1 on a problem."""
    from leader.precompute.cache import TeacherCache, find_problems
    from leader.shards.manifest import Manifest

    cache = TeacherCache.open(path)
    manifest = Manifest.load(shards)
    problems = find_problems(cache, manifest, deep=deep)
    unchecked = cache.unchecked_arrays() + [a for t in cache.teachers for a in cache.unchecked_arrays(t)]
    if model is not None:
        if teacher is None:
            raise LeaderError("cache verify: --model needs --teacher NAME (whose fingerprint to compare)")
        problems += _fingerprint_problems(cache, teacher, model, kind, _teacher_options(option, trust_model))
    if as_json:
        typer.echo(json.dumps({"cache": path, "shards": str(shards), "ok": not problems, "problems": problems,
                               "unchecked_arrays": unchecked}, indent=1))
    else:
        for problem in problems:
            typer.echo(f"problem: {problem}")
        if unchecked:
            typer.echo(f"note: {len(unchecked)} array(s) carry no checksums (written before leader added them): "
                       f"{', '.join(unchecked)}; a flipped bit there can decode to wrong values unseen")
        if not problems:
            typer.echo(f"{path}: ok ({cache.n_items} items, teachers: {', '.join(cache.teachers) or 'none'})")
    if problems:
        raise typer.Exit(1)


def _fingerprint_problems(cache, teacher: str, model: str, kind: Optional[str], options: dict) -> list[str]:
    from leader.precompute.teachers import create_teacher

    attrs = cache.teacher_attrs(teacher)
    kind = kind or attrs.get("kind")
    with create_teacher(kind, model=model, **options) as t:
        fingerprint = t.fingerprint
    if fingerprint != attrs.get("fingerprint"):
        return [f"teacher {teacher!r} was computed with weights sha256 {str(attrs.get('fingerprint'))[:12]}...; "
                f"{model} has {fingerprint[:12]}..."]
    return []


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
