"""The benchmark harness at toy sizes: every benchmark runs once and yields finite, positive ratios.

This checks the suite works end to end (real shards, a real cache, the official-style loader, the
trainer's stream and step, the synthetic million-item layout at small scale). It never asserts a
speed: timings on a shared CI machine mean nothing.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.__main__ import BENCHMARKS, run_suite
from benchmarks.harness import Context
from benchmarks.profiles import CPU_QUICK, ModelSpec
from benchmarks.scale import write_synthetic_set
from leader.shards.manifest import Manifest
from leader.train.loop import Distributed

REPO = Path(__file__).resolve().parents[1]

TOY = replace(
    CPU_QUICK, name="toy", original_size=64, stored_size=32, distinct_images=4, build_images=24,
    build_workers=(1, 2), train_images=32, shard_size=8, batch_size=8,
    student=ModelSpec("resnet18", 32, {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16], "stem_width": 8}),
    disease=ModelSpec("test_resnet", None), anatomy=ModelSpec("test_convnext", 32),
    loader_workers=(0, 1), pipeline_workers=1, warmup_steps=1, timed_steps=2, precompute_batch=16,
    overhead_sweep=((0, False),),
    scale_items=(1_000, 3_000), row_reads=10, step_batches=(4, 8), stage_images=4, end_to_end_rounds=1,
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    ctx = Context(TOY, torch.device("cpu"), tmp_path_factory.mktemp("bench"), log=lambda message: None)
    figures, seconds, errors = run_suite(ctx)
    assert errors == {}
    return ctx, figures, seconds


def test_every_benchmark_yields_finite_positive_ratios(suite):
    _, figures, seconds = suite
    assert list(seconds) == list(BENCHMARKS)
    assert {f.benchmark for f in figures} == set(BENCHMARKS)
    for f in figures:
        assert math.isfinite(f.ratio) and f.ratio > 0, f
        assert json.loads(json.dumps(f.to_dict()))["ratio"] == f.ratio


def test_figures_compare_what_the_issue_asks(suite):
    _, figures, _ = suite
    names = {f.name for f in figures}
    assert {"cached / official-style step rate", "cached / fully online step rate"} <= names
    assert {f"ours / official samples/s, {w} worker(s)" for w in TOY.loader_workers} <= names
    assert "trainer peak RSS, 3,000 / 1,000 items" in names
    assert {"pipeline / device-resident step time, 1 worker(s)", "pipeline / device-resident step time, 0 worker(s)",
            "pipeline mean / device-resident step time, epoch starts included"} <= names
    cost = next(f for f in figures if f.name == "compression ratio (raw / stored), disease")
    assert cost.detail["items"] == TOY.train_images and cost.detail["views"] == TOY.n_views
    checksum = next(f for f in figures if f.name == "block reads per CPU second, CRC32C / no checksum, disease")
    assert checksum.detail["rows_per_s_crc32c"] > 0 and checksum.detail["items"] == TOY.train_images


def test_official_targets_hold_the_cached_view_0_embedding(suite):
    from leader.precompute.cache import TeacherCache

    ctx, _, _ = suite
    work = ctx.workload
    cache = TeacherCache.open(work.cache)
    first = work.training_images()[0]
    keys = cache.read_keys(0, cache.n_items)
    row = next(i for i, key in enumerate(keys) if key.startswith(f"csv/images_{first.stem}_"))
    expected = cache.read_block("disease", row, row + 1)[0, 0].astype(np.float32)
    np.testing.assert_array_equal(np.load(work.official_targets / f"{first.stem}.npy"), expected)


def test_both_end_to_end_pipelines_train_on_the_same_images(suite):
    """Ours (shards, cache blocks, replay) and the official way (image files, .npy targets, the
    anatomy teacher online) take as many images per epoch, all from the training set: the official
    loader each once; ours each once but for its shuffle buffer's look-ahead. Its worker cycles
    over its shards to fill its quota, and the buffer draws from the next cycle before the quota
    is taken, so up to a buffer's worth of an epoch's last images repeat earlier ones."""
    ctx, figures, _ = suite
    seen = ctx.shared["end_to_end"]
    training = sorted(path.stem for path in ctx.workload.training_images())
    buffer = ctx.workload.train_config().data.shuffle_buffer * TOY.pipeline_workers
    assert len(seen["ours"]) == len(seen["official"]) == TOY.end_to_end_rounds
    for ours, official in zip(seen["ours"], seen["official"]):
        assert sorted(official) == training
        assert len(ours) == len(training) and set(ours) <= set(training)
        assert len(set(ours)) >= len(training) - buffer
    figure = next(f for f in figures if f.benchmark == "end_to_end")
    assert figure.detail["images_per_epoch"] == TOY.train_images


def test_the_official_step_trains_the_same_student_on_the_same_loss(suite):
    """Fed our own rendered pixels and the cached targets, the official-style step gives our step's
    loss: the two sides differ only in where pixels and targets come from."""
    from benchmarks.end_to_end import OfficialStep
    from benchmarks.step_rate import device_batches

    ctx, _, _ = suite
    work = ctx.workload
    batch = device_batches(ctx, 1)[0]
    ours = work.trainer().trainer
    pixels = ours.step.input.render(batch, ctx.device)
    anatomy = work.teachers["anatomy"]
    official = OfficialStep(ours.step, anatomy, ctx.device, channels_last=False)
    net = ours.net(["disease", "anatomy"], Distributed())
    with torch.no_grad():
        expected, parts = ours.step(net, dict(batch, targets={**batch["targets"],
                                                              "anatomy": official.anatomy_targets(pixels)}))
        got, got_parts = official(net, {"keys": batch["keys"], "pixels": pixels, "disease": batch["targets"]["disease"]})
    assert set(got_parts) == set(parts)
    torch.testing.assert_close(got, expected)


def test_mfu_uses_the_dense_bf16_peak_of_the_named_card():
    from benchmarks.student_step import dense_bf16_peak

    assert dense_bf16_peak("NVIDIA H200") == 989.0
    assert dense_bf16_peak("NVIDIA H200 NVL") == 835.0
    assert dense_bf16_peak("NVIDIA H100 80GB HBM3") == 989.0 and dense_bf16_peak("NVIDIA H100 PCIe") == 756.0
    assert dense_bf16_peak("NVIDIA A100-SXM4-80GB") == 312.0 and dense_bf16_peak("NVIDIA A10") == 125.0
    assert dense_bf16_peak("NVIDIA L40S") == 362.0 and dense_bf16_peak("NVIDIA L4") == 121.0
    assert dense_bf16_peak("NVIDIA GeForce RTX 4090") is None


def test_a_steps_counted_flops_grow_with_its_batch(suite):
    """The MFU's numerator: FlopCounterMode on the trainer's real step, forward and backward, which
    for the same images is proportional to the batch."""
    from benchmarks.step_rate import device_batches
    from benchmarks.student_step import flops_per_step

    ctx, figures, _ = suite
    small, large = (flops_per_step(ctx.workload.trainer(batch_size=b).train_step, device_batches(ctx, 1, b)[0])
                    for b in (4, 8))
    assert small > 0 and large == pytest.approx(2 * small, rel=0.02)
    step = next(f for f in figures if f.benchmark == "student_step")
    assert step.detail["flop_per_image"] == pytest.approx(small / 4, rel=0.02)


def test_synthetic_scale_set_is_a_valid_shard_set(tmp_path):
    manifest = write_synthetic_set(tmp_path / "synthetic", 2_000)
    again = Manifest.load(tmp_path / "synthetic")
    assert again.n_items == manifest.n_items == 2_000
    assert [s.rows for s in again.shards] == [(0, 1000), (1000, 2000)]


def test_cli_refuses_an_unknown_device():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--device", "tpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--device must be cpu or cuda" in done.stderr


def test_a_failing_benchmark_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    import benchmarks.cache_cost

    def broken(ctx):
        raise RuntimeError("CUDA out of memory (planted)")

    monkeypatch.setattr(benchmarks.cache_cost, "run", broken)
    ctx = Context(TOY, torch.device("cpu"), tmp_path, log=lambda message: None)
    snapshots = []
    figures, seconds, errors = run_suite(ctx, ("cache_cost", "scale"),
                                         after_each=lambda f, s, e: snapshots.append((len(f), dict(e))))
    assert errors == {"cache_cost": "RuntimeError: CUDA out of memory (planted)"}
    assert list(seconds) == ["cache_cost", "scale"]
    assert {f.benchmark for f in figures} == {"scale"}
    assert snapshots[0] == (0, errors) and snapshots[1][0] == len(figures)


def test_cli_refuses_an_unknown_profile():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--profile", "huge"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--profile must be one of cpu-quick, cpu-full, cuda, cuda-smoke" in done.stderr


def test_a_child_process_reports_its_own_peak_memory_not_its_parents():
    """ru_maxrss would hand a child its parent's peak (the scale benchmark once reported 1011 MB for
    every manifest size that way); VmHWM does not."""
    from benchmarks.harness import proc_status_mb

    ballast = np.ones(400 * 2**20, dtype=np.uint8)          # 400 MB this process really holds
    parent = proc_status_mb("VmRSS")
    done = subprocess.run([sys.executable, "-c", "from benchmarks.harness import peak_rss_mb; print(peak_rss_mb())"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < parent - 300, (float(done.stdout), parent)
    del ballast


def test_interleaved_timing_times_every_function_in_each_round():
    from benchmarks.harness import interleaved_step_times

    calls = []
    times = interleaved_step_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                   torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
