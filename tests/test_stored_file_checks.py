"""Shards, checkpoints and exports are checked against the sha256 recorded when they were written,
by every stage that reads them, before anything read from them is used.

    shards       manifest.json's sha256 per shard; the reader holds a shard's samples back until
                 the whole file matched (training stops naming it, or skips it when told to)
    checkpoints  RUN/checkpoint.pt.sha256, kept true to the file through every kill point
    exports      EXPORT/SHA256SUMS (`sha256sum -c` reads it too)
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from leader.checksums import SUMS_NAME, read_verified, replace_with_sidecar, sidecar_of, verify_folder
from leader.errors import LeaderError
from leader.io import atomic_write_bytes, sha256_file
from leader.shards.layout import DamagedShard, iter_samples, iter_shard
from leader.shards.manifest import Manifest
from leader.train.config import load_config
from leader.train.loop import train
from tests.conftest import one_thread

REPO = Path(__file__).resolve().parents[1]
SHORT = ["phases.0.steps=4", "phases.1.steps=4", "run.log_every=1", "run.checkpoint_every=2", "data.batch_size=4",
         "run.tensorboard=false"]


def flip_bit(file: Path, offset: int, bit: int = 2) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 1 << bit
    file.write_bytes(bytes(data))


def first_png_offset(shard: Path) -> int:
    import tarfile

    with tarfile.open(shard) as tar:
        return next(m.offset_data for m in tar if m.name.endswith(".png"))


def copy_shards(phantom_shards: Path, tmp_path: Path) -> Path:
    """The shard set with its cache beside it, so that a shard can be damaged without touching the session's."""
    out = tmp_path / "shards"
    shutil.copytree(phantom_shards, out)
    return out


def config(shards: Path, cache: Path, *overrides: str):
    return load_config(REPO / "configs" / "demo.yaml", [*SHORT, *overrides], shards=[str(shards)], caches=[str(cache)])


@pytest.fixture(scope="module")
def short_run(phantom_shards, train_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    with one_thread():
        assert train(config(phantom_shards, train_cache), out)["finished"]
    return out


# ---------------------------------------------------------------------------------------------
# Shards


def test_a_damaged_shard_yields_none_of_its_samples_and_is_named(phantom_shards, tmp_path):
    shards = copy_shards(phantom_shards, tmp_path)
    manifest = Manifest.load(shards)
    entry = manifest.shards[1]
    good = [s.key for s in iter_shard(shards / entry.name, entry.sha256)]
    assert len(good) == entry.n_samples
    flip_bit(shards / entry.name, (shards / entry.name).stat().st_size // 3)

    yielded = []
    with pytest.raises(DamagedShard) as damaged:
        for sample in iter_shard(shards / entry.name, entry.sha256):
            yielded.append(sample)
    assert yielded == [] and str(shards / entry.name) in str(damaged.value) and "\n" not in str(damaged.value)
    # Evaluation, the audit and the demo read through iter_samples; it checks every shard too.
    with pytest.raises(DamagedShard, match=entry.name):
        list(iter_samples(shards))


def test_training_stops_naming_a_damaged_shard_even_from_a_loader_worker(phantom_shards, train_cache, tmp_path):
    shards = copy_shards(phantom_shards, tmp_path)
    name = Manifest.load(shards).shards[0].name
    flip_bit(shards / name, 700)
    with one_thread(), pytest.raises(LeaderError) as stopped:
        train(config(shards, train_cache, "data.num_workers=2"), tmp_path / "run")
    message = str(stopped.value)
    assert "\n" not in message and f"shard {shards / name} is damaged" in message
    assert "none of its samples was used" in message


def test_skip_damaged_shards_trains_on_the_others_and_logs_each_with_a_count(phantom_shards, train_cache, tmp_path,
                                                                            caplog):
    shards = copy_shards(phantom_shards, tmp_path)
    name = Manifest.load(shards).shards[2].name
    flip_bit(shards / name, 2000)
    with one_thread(), caplog.at_level(logging.WARNING, logger="leader.train.loader"):
        summary = train(config(shards, train_cache, "data.skip_damaged_shards=true"), tmp_path / "run")
    assert summary["finished"] and summary["global_step"] == 8          # the schedule is kept
    skips = [r.getMessage() for r in caplog.records if "skipping a damaged shard" in r.getMessage()]
    assert skips and all(f"shard {shards / name} is damaged" in m for m in skips)
    assert "(data.skip_damaged_shards), 1 so far in this stream" in skips[0]


def test_embed_and_precompute_refuse_a_damaged_shard(phantom_shards, train_cache, short_run, tmp_path):
    from leader.precompute.run import CacheLayout, Execution, precompute
    from leader.train.embed import embed_items
    from tests.conftest import tiny_teacher

    shards = copy_shards(phantom_shards, tmp_path)
    name = Manifest.load(shards).shards[0].name
    flip_bit(shards / name, first_png_offset(shards / name) + 50)    # pixels: the metadata pass cannot see it
    with pytest.raises(DamagedShard, match=name):
        embed_items(short_run, shards, rows=[0, 1])
    with one_thread(), pytest.raises(DamagedShard, match=name):
        precompute(shards, "anatomy", tiny_teacher(tmp_path, "test_resnet"), tmp_path / "cache.zarr",
                   CacheLayout(views=1, patch_size=32), Execution(batch_size=64, decode_threads=0))


def test_an_import_teacher_never_matches_ids_from_a_damaged_shard(phantom_shards, tmp_path):
    """Image ids come from the metadata alone: a flipped digit would fetch another image's embedding."""
    import tarfile

    from leader.precompute.run import CacheLayout, Execution, precompute
    from leader.precompute.teachers import create_teacher
    from tests.teacher_fixtures import make_import_npy_dir, random_embeddings

    shards = copy_shards(phantom_shards, tmp_path)
    ids = [sample.meta["image_id"] for sample in iter_samples(shards)]
    folder = make_import_npy_dir(tmp_path / "embeddings", random_embeddings(ids))
    name = Manifest.load(shards).shards[1].name
    with tarfile.open(shards / name) as tar:
        member = next(m for m in tar if m.name.endswith(".json"))
        at = member.offset_data + tar.extractfile(member).read().index(b'"image_id": "') + len('"image_id": "') + 3
    flip_bit(shards / name, at, bit=0)                  # a digit of the id becomes its neighbour
    with pytest.raises(DamagedShard, match=name):
        precompute(shards, "disease", create_teacher("cxr-foundation-import", model=folder), tmp_path / "cache.zarr",
                   CacheLayout(views=1, patch_size=32), Execution(batch_size=64, decode_threads=0))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_a_checkpoint_carries_a_sidecar_that_sha256sum_accepts(short_run):
    sidecar = sidecar_of(short_run / "checkpoint.pt")
    assert sidecar.read_text() == f"{sha256_file(short_run / 'checkpoint.pt')}  checkpoint.pt\n"
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "-c", sidecar.name], cwd=short_run, check=True, capture_output=True)


def test_a_damaged_checkpoint_is_refused_by_resume_embed_export_and_evaluation(phantom_shards, train_cache, short_run,
                                                                              tmp_path):
    from leader.evaluate.representations import features
    from leader.train.embed import embed_items
    from leader.train.export import export_run

    run = shutil.copytree(short_run, tmp_path / "run")
    flip_bit(run / "checkpoint.pt", (run / "checkpoint.pt").stat().st_size // 2)
    refused = f"checkpoint {run / 'checkpoint.pt'} is damaged: its sha256 is"
    with pytest.raises(LeaderError, match=refused):
        train(config(phantom_shards, train_cache, "phases.1.steps=6"), run, resume=True)
    with pytest.raises(LeaderError, match=refused):
        embed_items(run, phantom_shards, rows=[0])
    with pytest.raises(LeaderError, match=refused):
        export_run(run, tmp_path / "export")
    with pytest.raises(LeaderError, match=refused):
        features(f"run:{run}", phantom_shards, rows=[0])
    assert not (tmp_path / "export").exists()


def test_a_checkpoint_from_before_sidecars_still_loads(short_run, tmp_path, caplog):
    from leader.train.checkpoint import Checkpoint

    run = shutil.copytree(short_run, tmp_path / "run")
    sidecar_of(run / "checkpoint.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert Checkpoint.load(run).state.finished
    assert "has no checksum sidecar" in caplog.text


@pytest.mark.parametrize("killed_at", ["the file", "the final sidecar"])
def test_a_kill_during_a_save_leaves_a_checkpoint_its_sidecar_accepts(tmp_path, killed_at):
    path = tmp_path / "checkpoint.pt"
    replace_with_sidecar(path, b"old weights", atomic_write_bytes)

    def killed(target: Path, data: bytes) -> None:
        if killed_at == "the file":
            raise KeyboardInterrupt              # the kill lands before the new checkpoint is in place
        atomic_write_bytes(target, data)
        raise KeyboardInterrupt                  # ... or after it, before the sidecar names it alone

    with pytest.raises(KeyboardInterrupt):
        replace_with_sidecar(path, b"new weights", killed)
    expected = b"old weights" if killed_at == "the file" else b"new weights"
    assert read_verified(path, "checkpoint") == expected
    assert len(sidecar_of(path).read_text().splitlines()) == 2        # both digests, until the next save
    replace_with_sidecar(path, b"newer weights", atomic_write_bytes)
    assert len(sidecar_of(path).read_text().splitlines()) == 1
    path.write_bytes(b"old weights")                                    # a digest it listed once is no longer good
    with pytest.raises(LeaderError, match="is damaged"):
        read_verified(path, "checkpoint")


# ---------------------------------------------------------------------------------------------
# Exports


def test_an_export_lists_its_files_and_each_reader_checks_them(short_run, tmp_path):
    from leader.evaluate.finetune import backbone_source
    from leader.precompute.teachers import create_teacher
    from leader.train.export import export_run, load_heads

    out = tmp_path / "export"
    export_run(short_run, out)
    assert verify_folder(out) == ["config.json", "heads.json", "heads.safetensors", "model.safetensors"]
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "-c", SUMS_NAME], cwd=out, check=True, capture_output=True)
    arch = json.loads((out / "config.json").read_text())["architecture"]
    assert load_heads(out)[0]["teachers"] == {"disease": 96, "anatomy": 64}

    flip_bit(out / "model.safetensors", (out / "model.safetensors").stat().st_size - 9)
    damaged = f"{out / 'model.safetensors'} is damaged"
    with pytest.raises(LeaderError, match=f"export {damaged}"):
        verify_folder(out)
    with pytest.raises(LeaderError, match=f"checkpoint {damaged}"):        # a fine-tuning source
        backbone_source(f"timm:{arch}:{out / 'model.safetensors'}", image_size=64)
    with pytest.raises(LeaderError, match=f"checkpoint {damaged}"):        # a teacher
        create_teacher("timm", model=out / "model.safetensors", arch=arch, input_size=64)
    flip_bit(out / "heads.safetensors", (out / "heads.safetensors").stat().st_size - 5)
    with pytest.raises(LeaderError, match=f"export file {out / 'heads.safetensors'} is damaged"):
        load_heads(out)

    export_run(short_run, out)                   # exporting again writes every file and the sums anew
    assert len(verify_folder(out)) == 4
