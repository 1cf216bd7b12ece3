"""Several processes on one cache at once: each safe combination ends with the store a sequential
run makes (bitwise: every array, and the attributes that describe it); each unsafe one is refused
in one line.

Safe: two teachers written by two processes at once; a third teacher written while a trainer reads
two others; the ranks of one run writing one teacher (tests/test_precompute.py). Refused: a second
writer of one teacher that is not another rank of the same run; --repair or --overwrite-teacher of
a teacher another process is reading. A killed writer leaves nothing that blocks the next one.

Writers run in their own processes as `leader precompute` does; a gate in their teacher calls
makes the runs overlap for certain instead of by luck of timing.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from leader.errors import LeaderError
from leader.precompute.cache import TeacherCache, repair_teacher
from leader.precompute.run import CacheLayout, Execution, precompute
from leader.precompute.teachers import create_teacher
from leader.shards.manifest import Manifest
from leader.train.metrics import read_metrics
from leader.views import ViewSpec
from tests.conftest import one_thread
from tests.teacher_fixtures import make_adam_v2_resnet_checkpoint
from tests.test_precompute import assert_same_store, wait_for

REPO = Path(__file__).resolve().parents[1]
LAYOUT, EXECUTION = CacheLayout(views=2, patch_size=32), Execution(batch_size=4)

# One writer: an Adam-v2 teacher (ResNet-18 at 32 px) precomputing teacher NAME. Its teacher calls
# wait, before the first one, until teacher AFTER exists in the store ("-": no wait), and, once
# shard 0 is done, until the file RELEASE exists ("-": no wait); each then sleeps DELAY seconds.
WRITER = """
import sys, time
from pathlib import Path
import torch
import zarr
from leader.precompute.run import CacheLayout, Execution, precompute
from leader.precompute.teachers import create_teacher

shards, cache, name, model, after, release, delay = sys.argv[1:8]
teacher = create_teacher("adam", model=model, arch="resnet18", input_size=32)
embed = teacher.embed

def gated_embed(pixels, bits=8):
    while after != "-" and not (Path(cache) / "teachers" / after / "done" / "zarr.json").exists():
        time.sleep(0.01)
    if release != "-" and zarr.open_array(f"{cache}/teachers/{name}/done", mode="r")[0]:
        while not Path(release).exists():
            time.sleep(0.01)
    time.sleep(float(delay))
    return embed(pixels, bits=bits)

teacher.embed = gated_embed
result = precompute(shards, name, teacher, cache, CacheLayout(views=2, patch_size=32), Execution(batch_size=4))
print("finished", result.shards_computed, result.complete, flush=True)
"""

# A reader of one teacher, as a trainer's loader reads it, that holds on until told to stop.
READER = """
import sys, time
from pathlib import Path
from leader.precompute.cache import TeacherCache

cache = TeacherCache.open(sys.argv[1])
a, b = cache.shard_rows[0]
print("reading", cache.read_block(sys.argv[2], a, b).shape, flush=True)
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
"""

# Attribute updates and teacher creations through the cache's API, many in a row.
CHURN = """
import sys
from leader.precompute.cache import TeacherCache

cache = TeacherCache.open(sys.argv[1], mode="r+")
tag = sys.argv[2]
for j in range(30):
    cache.ensure_teacher(f"{tag}{j}", {"kind": "fake", "dim": 4, "input_size": 32, "fingerprint": "a" * 64,
                                       "preprocessing": {}}, n_views=1)
    cache.update_teacher_attrs("shared", {f"{tag}{j}": j})
print("churned", flush=True)
"""


def start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LEADER_PROGRESS": "0", "OMP_NUM_THREADS": "1"})


def finished(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def done_flags(cache: Path, name: str) -> list[bool]:
    return zarr.open_array(str(cache / "teachers" / name / "done"), mode="r")[:].tolist()


def assert_same_root(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert {k: v for k, v in ga.attrs.items() if k != "created"} == {k: v for k, v in gb.attrs.items() if k != "created"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("adam")
    return {name: make_adam_v2_resnet_checkpoint(root / f"{name}.pth", seed=seed)
            for seed, name in enumerate(["disease", "anatomy", "third"])}


def sequential(shards: Path, cache: Path, models: dict, names: list[str]) -> Path:
    with one_thread():
        for name in names:
            teacher = create_teacher("adam", model=models[name], arch="resnet18", input_size=32)
            assert precompute(shards, name, teacher, cache, LAYOUT, EXECUTION).complete
    return cache


def test_two_teachers_written_at_once_give_the_sequential_store(phantom_shards, models, tmp_path):
    reference = sequential(phantom_shards, tmp_path / "sequential.zarr", models, ["disease", "anatomy"])

    cache = tmp_path / "together.zarr"       # both also create the store itself at the same moment
    writers = [start(WRITER, phantom_shards, cache, name, models[name], other, "-", 0.01)
               for name, other in (("disease", "anatomy"), ("anatomy", "disease"))]
    for writer in writers:
        assert "finished [0, 1, 2] True" in finished(writer)
    assert_same_store(cache, reference)
    assert_same_root(cache, reference)


def test_a_third_teacher_written_while_a_trainer_reads_two_others(phantom_shards, train_cache, models, tmp_path):
    from leader.train.config import load_config
    from leader.train.loop import train

    def run(cache: Path, out: Path) -> dict[int, float]:
        cfg = load_config(REPO / "configs" / "demo.yaml", ["phases.0.steps=6", "phases.1.steps=6", "run.log_every=1",
                                                            "run.checkpoint_every=3", "data.batch_size=4"],
                          shards=[str(phantom_shards)], caches=[str(cache)])
        with one_thread():
            assert train(cfg, out)["finished"]
        return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}

    copies = {name: tmp_path / f"{name}.zarr" for name in ("reference", "alone", "together")}
    for path in copies.values():
        shutil.copytree(train_cache, path)
    sequential(phantom_shards, copies["reference"], models, ["third"])
    undisturbed = run(copies["alone"], tmp_path / "run-alone")

    release = tmp_path / "release"
    writer = start(WRITER, phantom_shards, copies["together"], "third", models["third"], "-", release, 0.02)
    wait_for(lambda: (copies["together"] / "teachers/third/done/zarr.json").exists()
             and done_flags(copies["together"], "third")[0], timeout=120, what="the third teacher's first shard")
    assert done_flags(copies["together"], "third") == [True, False, False]      # half written
    release.touch()                          # it writes shards 1 and 2 while the trainer runs
    beside = run(copies["together"], tmp_path / "run-together")
    assert "finished [0, 1, 2] True" in finished(writer)

    assert beside == undisturbed and len(beside) == 12
    assert_same_store(copies["together"], copies["reference"])


def test_a_second_writer_of_one_teacher_is_refused_and_a_killed_one_blocks_nothing(phantom_shards, models, tmp_path):
    cache = tmp_path / "cache.zarr"
    release = tmp_path / "never"
    first = start(WRITER, phantom_shards, cache, "anatomy", models["anatomy"], "-", release, 0.0)
    wait_for(lambda: (cache / "teachers/anatomy/done/zarr.json").exists() and done_flags(cache, "anatomy")[0],
             timeout=120, what="the first writer's first shard")

    teacher = create_teacher("adam", model=models["anatomy"], arch="resnet18", input_size=32)
    who = f"is being written by pid {first.pid} on {socket.gethostname()} (rank 0 of 1, since "
    for rank, world in ((0, 1), (1, 2)):      # both believe they are rank 0 of 1 / another run's split
        with pytest.raises(LeaderError) as refused:
            precompute(phantom_shards, "anatomy", teacher, cache, LAYOUT,
                       Execution(batch_size=4, rank=rank, world_size=world))
        message = str(refused.value)
        assert who in message and f"this process would be rank {rank} of {world}" in message
        assert "\n" not in message and "must be the ranks of one run (RANK/WORLD_SIZE" in message
    # Another teacher of the same store is not affected.
    with one_thread():
        other = create_teacher("adam", model=models["disease"], arch="resnet18", input_size=32)
        assert precompute(phantom_shards, "disease", other, cache, LAYOUT, EXECUTION).complete

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert (cache / ".leader.writer.anatomy.0").exists()            # what the killed writer left
    with one_thread():
        resumed = precompute(phantom_shards, "anatomy", teacher, cache, LAYOUT, EXECUTION)
    assert resumed.shards_skipped == [0] and resumed.complete
    assert not list(cache.glob(".leader.writer.*"))                  # released on the way out
    reference = sequential(phantom_shards, tmp_path / "sequential.zarr", models, ["anatomy", "disease"])
    assert_same_store(cache, reference)


def test_repair_and_replacement_are_refused_while_another_process_reads_the_teacher(train_cache, phantom_shards,
                                                                                   tmp_path):
    cache = tmp_path / "cache.zarr"
    shutil.copytree(train_cache, cache)
    manifest = Manifest.load(phantom_shards)
    stop = tmp_path / "stop"
    reader = start(READER, cache, "disease", stop)
    assert reader.stdout.readline().startswith("reading")

    store = TeacherCache.open(cache, mode="r+")
    with pytest.raises(LeaderError, match=r"teacher 'disease' in cache .* is being read by another process .*; "
                                          r"--repair would change it under that reader"):
        repair_teacher(store, manifest, "disease")
    stored = store.teacher_attrs("disease")
    same = {k: stored[k] for k in ("kind", "dim", "input_size", "preprocessing", "fingerprint")}
    store.ensure_teacher("disease", same, n_views=2, replace_mismatched=True)   # a rerun that replaces nothing
    other_weights = {**same, "fingerprint": "b" * 64}
    with pytest.raises(LeaderError, match="replacing its embeddings would change it under that reader"):
        store.ensure_teacher("disease", other_weights, n_views=2, replace_mismatched=True)
    assert repair_teacher(store, manifest, "anatomy").shards_reset == []     # a teacher no one reads
    # This process's own readers do not count: it may repair what it has read itself.
    mine = TeacherCache.open(cache)
    mine.read_block("anatomy", 0, 1)
    repair_teacher(store, manifest, "anatomy")

    stop.touch()
    finished(reader)
    assert repair_teacher(store, manifest, "disease").shards_reset == []
    np.testing.assert_array_equal(TeacherCache.open(cache).read_block("disease", 0, 8),
                                  TeacherCache.open(train_cache).read_block("disease", 0, 8))


def test_attribute_updates_and_teacher_creation_from_two_processes_lose_nothing(phantom_shards, tmp_path):
    """Unlocked, zarr loses about half of such updates (each rewrites the group's zarr.json), and two
    first group creations can collide; through the cache's API, under its lock, nothing is lost."""
    cache = TeacherCache.create_or_open(tmp_path / "cache.zarr", Manifest.load(phantom_shards), n_views=1,
                                        view_spec=ViewSpec(), seed=0)
    cache.ensure_teacher("shared", {"kind": "fake", "dim": 4, "input_size": 32, "fingerprint": "a" * 64,
                                    "preprocessing": {}}, n_views=1)
    churners = [start(CHURN, cache.path, tag) for tag in "xy"]
    for churner in churners:
        assert "churned" in finished(churner)
    attrs = cache.teacher_attrs("shared")
    assert {f"{tag}{j}" for tag in "xy" for j in range(30)} <= set(attrs)
    assert len(cache.teachers) == 61
    assert all(cache.teacher_attrs(name).get("complete_arrays") for name in cache.teachers)
