"""The fault suite's tools: run `leader` as a real process, interrupt it at seeded points, and the
small inputs every fault test shares (phantom shards, tiny teachers, a reference cache and run).

Interruptions are placed by progress markers that only ever grow (a shard's state file, a shard's
done flag in the cache, the step inside checkpoint.pt), never by guessing how long a job takes:
the test waits for marker k, then a seeded delay more, and gives up the delay as soon as the job
comes within `guard` units of its end. Every interruption therefore lands while work remains.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch  # before anything that may import tensorflow (docs/design.md, section 2)
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
# Kill points and delays come from these seeds, so a failure reproduces exactly.
KILL_SEEDS = {"shards": 1201, "precompute": 1202, "train": 1203}
STEP_TIMEOUT = 240          # seconds any single `leader` process may take before the test fails

# The tiny pipeline every fault test shares: 16 shards of 2 phantom images at 32 px, two timm
# teachers at 32 px with 2 views per item, and the demo student for 8 + 8 steps of 4 images.
SHARDS = dict(n=32, size=32, shard_size=2, seed=0)
TEACHERS = {"disease": "test_resnet", "anatomy": "test_convnext"}
VIEWS, PATCH_SIZE = 2, 32
TRAIN_SET = ["phases.0.steps=8", "phases.1.steps=8", "data.batch_size=4", "run.log_every=1",
             "run.checkpoint_every=2", "run.tensorboard=false"]


# ---------------------------------------------------------------------------------------------
# Running the command line


def cli_env() -> dict[str, str]:
    """The environment of a `leader` subprocess: this checkout, quiet progress, one thread.

    One intra-op thread in every process (and in the in-process references) keeps float sums
    in the same order, so a resumed run can be compared exactly with an uninterrupted one.
    """
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "LEADER_PROGRESS": "0", "OMP_NUM_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "3"}


def leader_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "leader.cli", *map(str, args)]


def spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Start `leader ARGS` in its own session (so a signal can go to its whole process group)."""
    return subprocess.Popen(leader_command(*args), env=env or cli_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(*args: str, env: dict | None = None, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(leader_command(*args), env=env or cli_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def invoke(*args: str) -> Outcome:
    """`leader ARGS` inside this process, through leader.cli.main as the console script runs it.

    An exception that escapes main ends as it would end the interpreter: a traceback on stderr and
    exit status 1, so a test sees the same outcome as a user would.
    """
    from leader.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            traceback.print_exc()
            code = 1
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_one_line_error(outcome: Outcome | subprocess.CompletedProcess, *words: str) -> str:
    """A user-fixable failure: exit 2, one `error:` line naming the culprit, no traceback."""
    stderr = outcome.stderr.strip()
    code = outcome.code if isinstance(outcome, Outcome) else outcome.returncode
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run in-process references with the thread count the subprocesses use (see cli_env)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Interrupting a job


@dataclass(frozen=True)
class KillPoint:
    after_units: int       # wait until the job's progress marker reaches this many units
    delay: float           # then this many seconds more (cut short near the end of the job)


def kill_points(seed: int, n_units: int, guard: int, count: int = 5, max_delay: float = 0.25) -> list[KillPoint]:
    """`count` kill points spread over a job of `n_units`: the first in its start-up (before any
    unit is done: imports, teacher loading, store creation), the others after distinct, sorted
    unit counts below `n_units - guard`."""
    rng = np.random.default_rng(seed)
    units = sorted(rng.choice(np.arange(1, n_units - guard), size=count - 1, replace=False).tolist())
    points = [KillPoint(0, float(rng.uniform(0.5, 2.0)))]
    return points + [KillPoint(int(u), float(rng.uniform(0.0, max_delay))) for u in units]


def interrupt(proc: subprocess.Popen, progress: Callable[[], int], point: KillPoint, n_units: int, guard: int,
              sig: int = signal.SIGKILL, group: bool = False) -> int:
    """Send `sig` to the job at `point`; returns the progress (units) at the moment it was sent.

    The job must still be running when the signal goes: it has at least `guard` units left.
    """
    deadline = time.monotonic() + STEP_TIMEOUT
    while progress() < point.after_units:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before kill point {point}: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"no progress to {point.after_units} units in {STEP_TIMEOUT} s"
        time.sleep(0.005)
    until = time.monotonic() + point.delay
    while time.monotonic() < until and progress() < n_units - guard and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, f"the job ended before kill point {point}: {proc.communicate()[1][-2000:]}"
    units = progress()
    assert units < n_units, f"kill point {point} came after the last unit"
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    return units


def finish(proc: subprocess.Popen, timeout: float = STEP_TIMEOUT) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


# ---------------------------------------------------------------------------------------------
# Progress markers


def shards_done(out: Path) -> int:
    """Complete shards of a build in progress: the builder writes a state file after each tar."""
    return len(list((out / ".build").glob("shard-*.json")))


def cache_shards_done(cache: Path, teacher: str) -> int:
    """Shards flagged done for a teacher: one chunk file per flag, written after the shard's data."""
    flags = cache / "teachers" / teacher / "done" / "c"
    return sum(1 for p in flags.glob("*") if p.name.isdigit()) if flags.is_dir() else 0


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run's last complete checkpoint (0 before the first)."""
    path = run_dir / "checkpoint.pt"
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["state"]["global_step"])
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------------------------
# Comparing with the uninterrupted result


def assert_same_shard_set(out, reference):
    """Byte-identical shards, keys, rejects and manifest, and nothing else left in the folder."""
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in sorted(p.name for p in reference.iterdir()):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    keys = [line.split("\t")[0] for line in (out / "keys.txt").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == json.loads((out / "manifest.json").read_text())["n_samples"]


def assert_same_teacher(cache_path, reference_path, name):
    """The same rows in the same order, every embedding equal, every shard done, the same stats."""
    from leader.precompute.cache import TeacherCache

    cache, reference = TeacherCache.open(cache_path), TeacherCache.open(reference_path)
    n = reference.n_items
    keys = cache.read_keys(0, cache.n_items)
    assert keys == reference.read_keys(0, n) and len(set(keys)) == n, "missing, extra or duplicated rows"
    np.testing.assert_array_equal(cache.read_params(0, n), reference.read_params(0, n))
    assert cache.is_done(name).all()
    np.testing.assert_array_equal(cache.read_valid(name, 0, n), reference.read_valid(name, 0, n))
    emb = cache.read_block(name, 0, n)
    assert np.isfinite(emb).all()
    np.testing.assert_array_equal(emb, reference.read_block(name, 0, n))
    for mine, theirs in zip(cache.stats(name), reference.stats(name)):
        np.testing.assert_array_equal(mine, theirs)
    identity = ("kind", "fingerprint", "dim", "preprocessing", "n_views", "dtype")
    assert {k: cache.teacher_attrs(name)[k] for k in identity} == {k: reference.teacher_attrs(name)[k] for k in identity}


def assert_same_run(run_dir, reference_dir):
    """Same final weights and optimizer state; each step logged once, with the reference's loss.

    Tolerance: none beyond float32 round-off (rtol 1e-6). On the CPU with one thread every kernel
    is deterministic, and a resumed run replays the exact data order and random states.
    """
    mine = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    theirs = torch.load(reference_dir / "checkpoint.pt", weights_only=True)
    assert mine["state"] == theirs["state"] and mine["state"]["finished"]
    torch.testing.assert_close(mine["model"], theirs["model"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mine["optimizer"]["state"], theirs["optimizer"]["state"], rtol=1e-6, atol=1e-7)
    from leader.train.metrics import read_metrics

    got, expected = read_metrics(run_dir), read_metrics(reference_dir)
    assert [r["step"] for r in got] == list(range(1, len(expected) + 1)), "a step is missing or logged twice"
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in expected], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Shared inputs


def build_args(out: Path, **settings) -> list[str]:
    s = {**SHARDS, **settings}
    return ["shards", "build", "phantom", "--out", str(out), "--n", str(s["n"]), "--size", str(s["size"]),
            "--shard-size", str(s["shard_size"]), "--seed", str(s["seed"])]


def teacher_options(name: str) -> list[str]:
    return ["--kind", "timm", "--option", f"arch={TEACHERS[name]}", "--option", f"input_size={PATCH_SIZE}"]


def precompute_args(teacher: str, shards: Path, cache: Path, model: Path, views: int = VIEWS) -> list[str]:
    return ["precompute", "--teacher", teacher, "--shards", str(shards), "--cache", str(cache), "--model", str(model),
            *teacher_options(teacher), "--views", str(views), "--patch-size", str(PATCH_SIZE), "--batch-size", "64"]


def train_args(shards: Path, cache: Path, out: Path, *overrides: str, resume: bool = False) -> list[str]:
    args = ["train", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(out), "--shards", str(shards),
            "--cache", str(cache)]
    for item in (*TRAIN_SET, *overrides):
        args += ["--set", item]
    return args + (["--resume"] if resume else [])


def save_timm_checkpoint(path: Path, arch: str, seed: int = 1) -> Path:
    import timm

    torch.manual_seed(seed)
    torch.save(timm.create_model(arch, num_classes=0).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def fault_inputs(tmp_path_factory):
    """Phantom shards, the two teachers' checkpoints and their complete reference cache."""
    from leader.precompute.run import CacheLayout, Execution, precompute
    from leader.precompute.teachers import create_teacher
    from leader.shards.builder import BuildSettings, build_shards

    root = tmp_path_factory.mktemp("faults")
    shards = root / "shards"
    build_shards(BuildSettings(dataset="phantom", **SHARDS), shards)
    models = {name: save_timm_checkpoint(root / f"{arch}.pt", arch) for name, arch in TEACHERS.items()}
    cache = root / "cache.zarr"
    with torch_threads(1):
        for name, arch in TEACHERS.items():
            with create_teacher("timm", model=models[name], arch=arch, input_size=PATCH_SIZE) as teacher:
                precompute(shards, name, teacher, cache, CacheLayout(views=VIEWS, patch_size=PATCH_SIZE),
                           Execution(batch_size=64))
    return {"root": root, "shards": shards, "models": models, "cache": cache}


@pytest.fixture(scope="session")
def reference_run(fault_inputs):
    """The uninterrupted training run every interrupted one is compared with."""
    from leader.train.config import load_config
    from leader.train.loop import train

    out = fault_inputs["root"] / "reference-run"
    cfg = load_config(REPO / "configs" / "demo.yaml", TRAIN_SET, shards=[str(fault_inputs["shards"])],
                      caches=[str(fault_inputs["cache"])])
    with torch_threads(1):
        train(cfg, out)
    return out
