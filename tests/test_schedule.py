"""Algorithm 1's schedule: rounds of one pass of each phase, one learning-rate curve, exact resume
in the middle of a round; the paper's loss and head ablations; the fused optimizer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from leader.errors import LeaderError
from leader.schedule import warmup_cosine
from leader.train.checkpoint import TrainState
from leader.train.config import load_config
from leader.train.loop import make_optimizer, train
from leader.train.metrics import read_metrics
from leader.train.model import create_student
from tests.conftest import one_thread, sigterm_when

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# 3 rounds of (2 steps of images, 3 steps of pairs): 15 steps, one warm-up of 3 then one cosine.
ROUNDS = ["schedule.rounds=3", "phases.0.steps=2", "phases.1.steps=3", "optim.warmup_steps=3",
          "run.log_every=1", "run.checkpoint_every=100", "data.batch_size=4"]


@pytest.fixture(autouse=True)
def single_threaded():
    with one_thread():
        yield


def config(shards, cache, *overrides):
    return load_config(DEMO, list(overrides), shards=[str(shards)], caches=[str(cache)])


def test_rounds_alternate_the_phases_under_one_learning_rate_curve(phantom_shards, train_cache, tmp_path):
    cfg = config(phantom_shards, train_cache, *ROUNDS)
    summary = train(cfg, tmp_path / "run")
    assert summary["global_step"] == 15 and summary["segment"] == 6
    rows = read_metrics(tmp_path / "run")
    assert [(r["round"], r["phase"]) for r in rows] == [
        (r, p) for r in range(3) for p, n in (("images", 2), ("pairs", 3)) for _ in range(n)]
    lrs = [r["lr"] for r in rows]
    assert lrs == [warmup_cosine(i, 15, 3, cfg.optim.min_lr_ratio, base=cfg.optim.lr) for i in range(15)]
    assert lrs[2] == cfg.optim.lr and lrs[-1] < 0.2 * cfg.optim.lr
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))          # no restart at a phase or a round


def test_sequential_phases_restart_their_rate(phantom_shards, train_cache, tmp_path):
    cfg = config(phantom_shards, train_cache, "phases.0.steps=3", "phases.1.steps=3", "optim.warmup_steps=1",
                 "run.log_every=1", "data.batch_size=4")
    train(cfg, tmp_path / "run")
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run")]
    assert lrs[0] == lrs[3] == cfg.optim.lr                       # each phase warms up and decays on its own


def test_a_stop_in_the_middle_of_a_round_resumes_to_the_same_run(phantom_shards, train_cache, tmp_path):
    reference = tmp_path / "reference"
    train(config(phantom_shards, train_cache, *ROUNDS), reference)

    stopped = tmp_path / "stopped"
    inside_round_two = lambda: max((r["step"] for r in read_metrics(stopped)), default=0) >= 8   # noqa: E731
    with sigterm_when(inside_round_two):        # round 2's pairs pass holds steps 8-10
        summary = train(config(phantom_shards, train_cache, *ROUNDS), stopped)
    assert summary["stopped"] and 8 <= summary["global_step"] < 15
    train(config(phantom_shards, train_cache, *ROUNDS), stopped, resume=True)
    got, expected = read_metrics(stopped), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(1, 16))
    for a, b in zip(got, expected):
        assert {k: v for k, v in a.items() if k != "samples_per_s"} == {k: v for k, v in b.items() if k != "samples_per_s"}


def test_rounds_take_no_rate_per_phase(phantom_shards, train_cache):
    with pytest.raises(LeaderError, match=r"phases.0 \(images\): lr and warmup_steps per phase belong to the sequential"):
        config(phantom_shards, train_cache, *ROUNDS, "phases.0.lr=0.1")


@pytest.mark.parametrize("overrides", [["loss.kind=cross_entropy"], ["model.head=dino"],
                                       ["model.head=dino", "model.head_layers=1", "loss.kind=cross_entropy"]],
                         ids=["cross-entropy", "dino-head", "both"])
def test_each_loss_and_head_trains(phantom_shards, train_cache, tmp_path, overrides):
    cfg = config(phantom_shards, train_cache, "phases.0.steps=60", "phases.1.steps=60", "run.log_every=1",
                 "optim.warmup_steps=5", "data.batch_size=8", *overrides)
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    for phase, key in (("images", "loss/disease/image"), ("pairs", "loss/anatomy/patch")):
        curve = [r[key] for r in rows if r["phase"] == phase]
        assert np.mean(curve[-10:]) < 0.9 * np.mean(curve[:10]), (phase, curve[:10], curve[-10:])


def test_the_fused_optimizer_takes_the_reference_step():
    cfg = load_config(DEMO)
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        student = create_student(cfg.model, {"disease": 8})
        cfg.optim.fused = fused
        optimizer = make_optimizer(student, cfg.optim, torch.device("cpu"))
        assert bool(optimizer.defaults.get("fused")) == fused
        torch.manual_seed(1)
        for _ in range(3):
            _, out = student(torch.rand(4, 3, 32, 32))
            out["disease"].square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        weights.append(student.state_dict())
    for name, value in weights[0].items():
        # The fused kernel orders its arithmetic differently: 3 steps of lr 2e-3 move weights by ~6e-3.
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-5)


def test_positions_saved_before_rounds_carry_over():
    state = TrainState.from_dict({"phase": 1, "step_in_phase": 7, "global_step": 107, "samples": 1712, "finished": False})
    assert (state.segment, state.step_in_segment, state.global_step) == (1, 7, 107)


def test_the_paper_config_runs_algorithm_1_in_rounds_with_patches_from_d7_to_d10():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "leader-swinb.yaml", shards=["unused"])
    assert cfg.schedule.rounds == 100 and cfg.optim.warmup_fraction == 0.1
    images, pairs = cfg.phases
    assert (images.stream, images.datasets, images.epochs) == ("images", "all", 1)
    assert (pairs.stream, sorted(pairs.datasets), pairs.epochs) == ("pairs", ["chestx-det", "node21", "tbx11k", "vindr"], 1)
