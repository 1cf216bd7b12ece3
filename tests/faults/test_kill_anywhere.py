"""Kill anywhere: every long job, killed at any moment and rerun, ends exactly where an
uninterrupted run ends; SIGTERM stops it cleanly after the unit in progress, with exit status 0.

Each stage runs as a real `leader` process and is killed five times in a row at seeded points
(the first at a seeded moment of its start-up, the others after distinct numbers of finished units), each rerun
resuming what the previous one left. The final result is compared with the reference built
without interruption: shards byte for byte, the cache array by array, the student weight by weight.
"""
from __future__ import annotations

import json
import re
import signal

import numpy as np
import torch

from tests.faults.conftest import (
    KILL_SEEDS, KillPoint, assert_same_run, assert_same_shard_set, assert_same_teacher, build_args,
    cache_shards_done, checkpoint_step, finish, interrupt, invoke, kill_points, precompute_args, run, shards_done,
    spawn, torch_threads, train_args)

N_SHARDS = 16
TRAIN_STEPS, CHECKPOINT_EVERY = 16, 2


# ---------------------------------------------------------------------------------------------
# SIGKILL at five seeded points per stage


def test_shards_build_killed_anywhere_resumes_to_identical_shards(fault_inputs, tmp_path):
    out = tmp_path / "shards"
    guard = 3
    landed = []
    for point in kill_points(KILL_SEEDS["shards"], N_SHARDS, guard):
        proc = spawn(*build_args(out))
        landed.append(interrupt(proc, lambda: shards_done(out), point, N_SHARDS, guard))
        assert finish(proc)[0] == -signal.SIGKILL
        assert not (out / "manifest.json").exists(), f"kill at {point} (after {landed[-1]} shards) was too late"
    result = run(*build_args(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 32
    assert_same_shard_set(out, fault_inputs["shards"])


def test_precompute_killed_anywhere_resumes_to_the_same_cache(fault_inputs, tmp_path):
    cache = tmp_path / "cache.zarr"
    args = precompute_args("disease", fault_inputs["shards"], cache, fault_inputs["models"]["disease"])
    guard = 3
    for point in kill_points(KILL_SEEDS["precompute"], N_SHARDS, guard):
        proc = spawn(*args)
        units = interrupt(proc, lambda: cache_shards_done(cache, "disease"), point, N_SHARDS, guard)
        assert finish(proc)[0] == -signal.SIGKILL
        assert cache_shards_done(cache, "disease") < N_SHARDS, f"kill at {point} (after {units} shards) was too late"
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert_same_teacher(cache, fault_inputs["cache"], "disease")


def test_train_killed_anywhere_resumes_to_the_same_weights(fault_inputs, reference_run, tmp_path):
    out = tmp_path / "run"
    n_units, guard = TRAIN_STEPS // CHECKPOINT_EVERY, 2

    def checkpoints_written() -> int:
        return checkpoint_step(out) // CHECKPOINT_EVERY

    for point in kill_points(KILL_SEEDS["train"], n_units, guard):
        # Killed before its first checkpoint, a run starts again; after it, it resumes.
        resume = (out / "checkpoint.pt").exists()
        proc = spawn(*train_args(fault_inputs["shards"], fault_inputs["cache"], out, resume=resume))
        units = interrupt(proc, checkpoints_written, point, n_units, guard)
        assert finish(proc)[0] == -signal.SIGKILL
        assert checkpoint_step(out) < TRAIN_STEPS, f"kill at {point} (after {units} checkpoints) was too late"
    result = run(*train_args(fault_inputs["shards"], fault_inputs["cache"], out, resume=True))
    assert result.returncode == 0, result.stderr
    assert_same_run(out, reference_run)


# ---------------------------------------------------------------------------------------------
# SIGTERM: finish the unit in progress, save, exit 0; the rerun completes the same result


def test_sigterm_to_a_shard_build_finishes_the_shard_in_progress(fault_inputs, tmp_path):
    out = tmp_path / "shards"
    # Two decode workers, and the signal goes to the whole process group as a scheduler sends it.
    proc = spawn(*build_args(out), "--workers", "2")
    units = interrupt(proc, lambda: shards_done(out), KillPoint(4, 0.0), N_SHARDS, 3, sig=signal.SIGTERM, group=True)
    # Progress is read, then the signal sent: a shard may finish in between (they take milliseconds),
    # so the count right after the signal bounds where it may stop too.
    units_at_signal = shards_done(out)
    code, _, stderr = finish(proc)
    assert code == 0, stderr
    stopped = re.search(r"stopped after shard (\d+) \((shard-\d+\.tar)\) on SIGTERM; rerun the same command to resume",
                        stderr)
    assert stopped, stderr
    last = int(stopped.group(1))
    assert shards_done(out) == last + 1
    assert units <= last + 1 <= units_at_signal + 1, "it should stop right after the shard in progress"
    assert not (out / "manifest.json").exists()
    for name in (f"shard-{i:06d}.tar" for i in range(last + 1)):
        assert (out / name).read_bytes() == (fault_inputs["shards"] / name).read_bytes()

    assert invoke(*build_args(out)).code == 0
    assert_same_shard_set(out, fault_inputs["shards"])


def test_sigterm_to_precompute_flags_the_shard_in_progress_and_exits_0(fault_inputs, tmp_path):
    from leader.precompute.cache import TeacherCache

    cache = tmp_path / "cache.zarr"
    args = precompute_args("disease", fault_inputs["shards"], cache, fault_inputs["models"]["disease"])
    proc = spawn(*args)
    units = interrupt(proc, lambda: cache_shards_done(cache, "disease"), KillPoint(4, 0.0), N_SHARDS, 3,
                      sig=signal.SIGTERM)
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr
    assert re.search(r"stopped on SIGTERM after shard \d+; rerun the same command to resume", stdout + stderr), stderr
    done = TeacherCache.open(cache).is_done("disease")
    assert int(done.sum()) in (units, units + 1) and not done.all()
    reference = TeacherCache.open(fault_inputs["cache"])
    for a, b in (reference.shard_rows[i] for i in np.flatnonzero(done)):
        np.testing.assert_array_equal(TeacherCache.open(cache).read_block("disease", a, b),
                                      reference.read_block("disease", a, b))

    with torch_threads(1):
        assert invoke(*args).code == 0
    assert_same_teacher(cache, fault_inputs["cache"], "disease")


def test_sigterm_to_train_checkpoints_the_step_in_progress_and_exits_0(fault_inputs, reference_run, tmp_path):
    from leader.train.metrics import read_metrics

    out = tmp_path / "run"
    proc = spawn(*train_args(fault_inputs["shards"], fault_inputs["cache"], out))
    interrupt(proc, lambda: checkpoint_step(out) // CHECKPOINT_EVERY, KillPoint(2, 0.0), TRAIN_STEPS // CHECKPOINT_EVERY,
              2, sig=signal.SIGTERM)
    code, _, stderr = finish(proc)
    assert code == 0, stderr
    assert "stopped (resume with --resume)" in stderr
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["state"]
    assert not saved["finished"] and saved["global_step"] < TRAIN_STEPS
    assert read_metrics(out)[-1]["step"] == saved["global_step"], "the step in progress was finished and saved"

    with torch_threads(1):
        assert invoke(*train_args(fault_inputs["shards"], fault_inputs["cache"], out, resume=True)).code == 0
    assert_same_run(out, reference_run)


# ---------------------------------------------------------------------------------------------
# What a kill leaves behind: the temporary file of the write it interrupted


def test_a_resumed_build_removes_the_temporary_files_of_interrupted_writes(fault_inputs, tmp_path):
    out = tmp_path / "shards"
    (out / ".build").mkdir(parents=True)
    # A kill during an atomic write leaves `.<name>.<random>.tmp`; a real shard's is a gigabyte.
    (out / ".shard-000004.tar.k1ll3d.tmp").write_bytes(b"\0" * 4096)
    (out / ".build" / ".shard-000003.json.k1ll3d.tmp").write_text("{")
    assert invoke(*build_args(out)).code == 0
    assert_same_shard_set(out, fault_inputs["shards"])


def test_a_resumed_run_removes_the_temporary_file_of_an_interrupted_checkpoint(fault_inputs, reference_run, tmp_path):
    import shutil

    out = shutil.copytree(reference_run, tmp_path / "run")
    stale = out / ".checkpoint.pt.k1ll3d.tmp"                   # a Swin-B checkpoint with AdamW state: ~1.3 GB
    stale.write_bytes(b"\0" * 4096)
    with torch_threads(1):
        assert invoke(*train_args(fault_inputs["shards"], fault_inputs["cache"], out, resume=True)).code == 0
    assert not stale.exists()
