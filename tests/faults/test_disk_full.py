"""Disk full: a write that fails with ENOSPC leaves the previous complete state intact, the job
stops with one line that names the file and says so, and a rerun after freeing space finishes
with the same result as a run that never hit the wall.

The failures are real: the chosen write goes to /dev/full, where the kernel answers every write
with ENOSPC, so the code under test sees exactly what a full file system gives it.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from leader.errors import LeaderError
from leader.io import atomic_write_bytes
from tests.faults.conftest import (
    assert_one_line_error, assert_same_run, assert_same_shard_set, assert_same_teacher, build_args, invoke,
    precompute_args, torch_threads, train_args)

pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")


def fill_disk_for(monkeypatch, file_name: str, after: int = 0) -> None:
    """Atomic writes of `file_name` (leader.io, checkpoints) after the first `after` go to /dev/full.

    Atomic writes create their temporary file with tempfile.mkstemp(prefix=".<name>."); the file
    is created as usual (so its cleanup is exercised), and the descriptor handed back is /dev/full's.
    """
    real_mkstemp = tempfile.mkstemp
    seen = []

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        fd, path = real_mkstemp(suffix, prefix, dir, text)
        if prefix == f".{file_name}.":
            seen.append(path)
            if len(seen) > after:
                os.close(fd)
                fd = os.open("/dev/full", os.O_WRONLY)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def fill_disk_for_zarr_chunks(monkeypatch, array_dir: str, after: int) -> None:
    """Chunk writes under `array_dir` of a Zarr store, after the first `after`, go to /dev/full.

    zarr's local store writes each chunk to a `.partial` file opened with Path.open, then renames it.
    """
    real_open = Path.open
    writes = []

    def open_(self, mode="r", *args, **kwargs):
        if "w" in mode and self.name.endswith(".partial") and array_dir in self.as_posix():
            writes.append(self)
            if len(writes) > after:
                return open("/dev/full", "wb")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


def no_temporary_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial"))]


# ---------------------------------------------------------------------------------------------
# The atomic write itself


@pytest.mark.parametrize("size", [100, 1 << 20])          # buffered (fails at flush) and direct (fails at write)
def test_atomic_write_on_a_full_disk_keeps_the_previous_version(monkeypatch, tmp_path, size):
    path = tmp_path / "state.json"
    atomic_write_bytes(path, b"previous")
    fill_disk_for(monkeypatch, "state.json")
    with pytest.raises(LeaderError) as failure:
        atomic_write_bytes(path, b"x" * size)
    assert str(failure.value) == (f"no space left on device while writing {path}; the previous version of it is "
                                  "intact. Free some space and rerun")
    assert isinstance(failure.value.__cause__, OSError) and failure.value.__cause__.errno == errno.ENOSPC
    assert path.read_bytes() == b"previous"
    assert no_temporary_files(tmp_path) == []


def test_atomic_write_of_a_new_file_on_a_full_disk_leaves_nothing(monkeypatch, tmp_path):
    fill_disk_for(monkeypatch, "new.bin")
    with pytest.raises(LeaderError, match="no partial file was left"):
        atomic_write_bytes(tmp_path / "new.bin", b"data")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The stages


@pytest.mark.parametrize("file_name", ["shard-000005.tar", "manifest.json"])
def test_shards_build_on_a_full_disk_keeps_finished_shards_and_resumes(fault_inputs, monkeypatch, tmp_path, file_name):
    out = tmp_path / "shards"
    with monkeypatch.context() as m:
        fill_disk_for(m, file_name)
        result = invoke(*build_args(out))
    assert_one_line_error(result, f"no space left on device while writing {out / file_name}")
    assert not (out / "manifest.json").exists()
    finished = sorted(p.name for p in out.glob("shard-*.tar"))
    assert finished == sorted(f"{p.stem}.tar" for p in (out / ".build").glob("shard-*.json")), \
        "every shard on disk is complete, with its resume state"
    for name in finished:
        assert (out / name).read_bytes() == (fault_inputs["shards"] / name).read_bytes()
    assert no_temporary_files(out) == []

    assert invoke(*build_args(out)).code == 0                  # space freed: the rerun completes
    assert_same_shard_set(out, fault_inputs["shards"])


def test_precompute_on_a_full_disk_keeps_finished_shards_and_resumes(fault_inputs, monkeypatch, tmp_path):
    from leader.precompute.cache import TeacherCache

    cache = tmp_path / "cache.zarr"
    args = precompute_args("disease", fault_inputs["shards"], cache, fault_inputs["models"]["disease"])
    with monkeypatch.context() as m, torch_threads(1):
        fill_disk_for_zarr_chunks(m, "teachers/disease/emb", after=40)
        result = invoke(*args)
    assert_one_line_error(result, "no space left on device", str(cache), "disease")
    store, reference = TeacherCache.open(cache), TeacherCache.open(fault_inputs["cache"])
    done = store.is_done("disease")
    assert 0 < done.sum() < len(done)
    for a, b in (store.shard_rows[i] for i in np.flatnonzero(done)):
        np.testing.assert_array_equal(store.read_block("disease", a, b), reference.read_block("disease", a, b))

    with torch_threads(1):
        assert invoke(*args).code == 0
    assert_same_teacher(cache, fault_inputs["cache"], "disease")


def test_train_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(fault_inputs, reference_run, monkeypatch,
                                                                   tmp_path):
    out = tmp_path / "run"
    with monkeypatch.context() as m, torch_threads(1):
        fill_disk_for(m, "checkpoint.pt", after=2)              # the checkpoints of steps 2 and 4 fit
        result = invoke(*train_args(fault_inputs["shards"], fault_inputs["cache"], out))
    assert_one_line_error(result, f"no space left on device while writing {out / 'checkpoint.pt'}",
                          "the previous version of it is intact")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["global_step"] == 4
    assert no_temporary_files(out) == []

    with torch_threads(1):
        assert invoke(*train_args(fault_inputs["shards"], fault_inputs["cache"], out, resume=True)).code == 0
    assert_same_run(out, reference_run)


def test_a_full_disk_while_logging_metrics_names_the_file(tmp_path):
    from leader.train.metrics import MetricsLog

    log = MetricsLog(tmp_path, tensorboard=False)
    log.log({"step": 1, "loss": 0.5})
    log.file.close()
    log.file = open("/dev/full", "a", buffering=1)       # the disk fills between two log lines
    with pytest.raises(LeaderError, match=r"no space left on device while appending step 2 to .*metrics.jsonl; "
                                          r"the last checkpoint is intact.*--resume") as failure:
        log.log({"step": 2, "loss": 0.4})
    assert failure.value.__cause__.errno == errno.ENOSPC
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
