"""The training loop: Algorithm 1's phases, one screen, no framework in between.

    summary = train(load_config("configs/demo.yaml", shards=["shards/phantom"]), "runs/demo")

Runs as one process or under `torchrun` (DDP; gloo on CPU, nccl on GPU). Rank 0 writes the run
directory: config.yaml, metrics.jsonl, tensorboard/, train.log and checkpoint.pt. SIGTERM (a
scheduler's pre-emption) finishes the current step, writes a checkpoint and returns normally, so the
command exits 0 and `--resume` continues exactly.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from leader.errors import LeaderError
from leader.progress import progress, rate_text
from leader.schedule import warmup_cosine
from leader.train.averaging import CHECKPOINT_KEY as AVERAGE_KEY, WeightAverage
from leader.train.checkpoint import (CHECKPOINT_NAME, TrainState, capture_rng, load_checkpoint, remove_interrupted_saves, restore_rng,
                                     save_checkpoint)
from leader.train.config import OptimConfig, TrainConfig, resume_conflicts, save_config
from leader.train.loader import StreamSpec, phase_batches
from leader.train.metrics import MetricsLog
from leader.train.model import Student, TargetNorm, create_student
from leader.train.sources import TrainingSources, open_sources
from leader.train.step import DistillationStep, StudentInput

log = logging.getLogger("leader.train")


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False          # this run joined the process group, so it leaves it too

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_kind: str) -> Distributed:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise LeaderError("run.device is cuda but no CUDA device is available")
        setting = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(setting)


def make_optimizer(student: Student, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over every parameter; biases and norm weights take no weight decay.

    Heads a phase does not train get no gradient, and AdamW leaves them (and their state) alone.
    """
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


class StopSignal:
    """SIGTERM sets a flag; the loop checkpoints at the end of the step and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopSignal":
        with contextlib.suppress(ValueError):   # not the main thread: no handler, no stop
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        log.warning("SIGTERM: writing a checkpoint after this step, then stopping")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, ddp: Distributed, device: torch.device) -> bool:
        """Every rank stops at the same step, whichever of them got the signal."""
        if not ddp.active:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def prepare_run(cfg: TrainConfig, out: Path, resume: bool, ddp: Distributed) -> dict | None:
    """Check the run directory against --resume; returns the checkpoint to continue from."""
    has_checkpoint = (out / CHECKPOINT_NAME).exists()
    if not resume:
        if has_checkpoint:
            raise LeaderError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        if ddp.main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out)
        return None
    if not has_checkpoint:
        raise LeaderError(f"--resume: {out} holds no checkpoint to continue")
    checkpoint = load_checkpoint(out)
    conflicts = resume_conflicts(checkpoint["config"], cfg.to_dict())
    if conflicts:
        raise LeaderError(f"--resume refused: {conflicts[0]}" + (f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else "")
                          + "; start a new --out for a different run")
    if ddp.main:
        remove_interrupted_saves(out)
        save_config(cfg, out)
    return checkpoint


@contextlib.contextmanager
def run_log(out: Path, enabled: bool):
    """RUN/train.log receives leader's INFO messages (phases, view choices, stops) while training."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("leader")
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def check_same_inputs(checkpoint: dict, sources: TrainingSources, head_dims: dict[str, int]) -> None:
    """--resume continues on the data and teachers it started with (shard paths may move)."""
    if checkpoint["head_dims"] != head_dims:
        raise LeaderError(f"--resume: the caches' teacher dimensions {head_dims} differ from the run's heads "
                          f"{checkpoint['head_dims']}")
    before, now = checkpoint["sources"], sources.describe()
    for a, b in zip(before["shard_sets"], now["shard_sets"]):
        if (a["dataset"], a["manifest_fingerprint"]) != (b["dataset"], b["manifest_fingerprint"]):
            raise LeaderError(f"--resume: shard set {b['root']} ({b['dataset']}) is not the one the run started on "
                              f"({a['root']}, {a['dataset']}, manifest {a['manifest_fingerprint'][:12]}...)")
    for name, info in now["teachers"].items():
        if before["teachers"].get(name, {}).get("fingerprint") != info["fingerprint"]:
            raise LeaderError(f"--resume: teacher {name!r} in the caches was computed with other weights than the "
                              f"run's targets (sha256 {info['fingerprint'][:12]}...)")


def optimizer_step(net, step: DistillationStep, batches, optimizer: torch.optim.Optimizer, student: Student,
                   cfg: OptimConfig, ddp: Distributed) -> tuple[int, int, dict[str, float], float]:
    """grad_accum micro-batches, clipping, one AdamW step -> (epoch, samples on all ranks, losses, grad norm).

    Losses stay on the device until the step is done: one host sync per step, not per micro-batch.
    """
    accum, samples, parts_sum = cfg.grad_accum, 0, {}
    for micro in range(accum):
        epoch, batch = next(batches)
        # DDP all-reduces gradients on backward; the micro-batches before the last only accumulate.
        quiet = ddp.active and micro < accum - 1 and hasattr(net, "no_sync")
        with net.no_sync() if quiet else contextlib.nullcontext():
            loss, parts = step(net, batch)
            (loss / accum).backward()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v.detach() / accum
        samples += len(batch["keys"]) * ddp.world_size
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return epoch, samples, {k: float(v) for k, v in parts_sum.items()}, float(grad_norm)


def gather_rng(ddp: Distributed) -> list:
    states = [capture_rng()]
    if ddp.active:
        states = [None] * ddp.world_size
        dist.all_gather_object(states, capture_rng())
    return states


def mean_over_ranks(values: dict[str, float], ddp: Distributed, device: torch.device) -> dict[str, float]:
    if not ddp.active:
        return values
    t = torch.tensor(list(values.values()), device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / ddp.world_size).tolist()))


def train(cfg: TrainConfig, out: str | Path, resume: bool = False) -> dict:
    """Train (or continue) the run in `out`; returns a summary of where it stopped."""
    out = Path(out)
    device = pick_device(cfg.run.device)
    ddp = setup_distributed(device.type)
    try:
        sources = open_sources(cfg.data.shards, cfg.data.caches, cfg.teachers())     # refuse bad inputs first
        checkpoint = prepare_run(cfg, out, resume, ddp)
        if ddp.active:
            dist.barrier()
        with run_log(out, ddp.main):
            return _train(cfg, out, sources, checkpoint, ddp, device)
    finally:
        # Left to interpreter exit, gloo's threads were once torn down mid-flight: a DDP run that
        # had finished every step aborted with "terminate called without an active exception".
        if ddp.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, out: Path, sources: TrainingSources, checkpoint: dict | None, ddp: Distributed,
           device: torch.device) -> dict:
    head_dims = {t: sources.teachers[t].dim for t in cfg.teachers()}
    stats = {t: sources.pooled_stats(t) for t in head_dims} if cfg.target_norm == "standardize" else None
    torch.manual_seed(cfg.seed)                                     # the same initial weights on every rank
    student = create_student(cfg.model, head_dims)
    norm = TargetNorm(cfg.target_norm, head_dims, stats)
    state = TrainState()
    if checkpoint is not None:
        check_same_inputs(checkpoint, sources, head_dims)
        student.load_state_dict(checkpoint["model"])
        norm.load_state_dict(checkpoint["target_norm"])
        state = TrainState(**checkpoint["state"])
    student.to(device)
    norm.to(device)
    if cfg.run.channels_last:
        student.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(student, cfg.optim)
    average = None
    if cfg.optim.ema_decay > 0:
        saved = checkpoint.get(AVERAGE_KEY) if checkpoint is not None else None
        average = (WeightAverage.resume(saved, student, cfg.optim.ema_decay) if saved
                   else WeightAverage.start(student, cfg.optim.ema_decay))
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        rngs = checkpoint["rng"]
        restore_rng(rngs[ddp.rank] if len(rngs) == ddp.world_size else rngs[0])
    else:
        torch.manual_seed(cfg.seed + ddp.rank)                      # ranks differ from here on (dropout, drop-path)
    autocast = torch.bfloat16 if device.type == "cuda" and cfg.run.precision == "bf16" else None
    patch_size = sources.patch_size()
    step = DistillationStep(StudentInput(cfg.model.image_size, patch_size, cfg.model.in_chans, tuple(cfg.model.mean),
                                         tuple(cfg.model.std), cfg.run.channels_last), norm, device, autocast)
    metrics = MetricsLog(out, ddp.main, cfg.run.tensorboard, state.global_step if checkpoint is not None else None)
    accum = cfg.optim.grad_accum

    def save() -> None:
        rng = gather_rng(ddp)
        if ddp.main:
            save_checkpoint(out, {"model": student.state_dict(), "target_norm": norm.state_dict(),
                                  "optimizer": optimizer.state_dict(), "state": state.to_dict(), "rng": rng,
                                  "config": cfg.to_dict(), "head_dims": head_dims, "patch_size": patch_size,
                                  "sources": sources.describe(),
                                  **({AVERAGE_KEY: average.state_dict()} if average is not None else {})})

    with StopSignal() as stop, progress("steps") as bar:
        for p in range(state.phase, len(cfg.phases)):
            phase = cfg.phases[p]
            spec = StreamSpec.for_phase(sources, phase, cfg, ddp.world_size)
            total = phase.steps or math.ceil(phase.epochs * spec.batches_per_epoch / accum)
            lr, warmup = phase.lr or cfg.optim.lr, cfg.optim.warmup_steps if phase.warmup_steps is None else phase.warmup_steps
            log.info("phase %s: %s on %d tuples/epoch, %d optimizer steps (%d per epoch), branches %s", phase.name,
                     phase.stream, spec.tuples_per_epoch, total, spec.batches_per_epoch // accum, phase.branches)
            net = student.restricted(phase.branches)
            if ddp.active:
                net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
            if cfg.run.compile:
                net = torch.compile(net)
            batches = phase_batches(spec, state.step_in_phase * accum, ddp.rank, ddp.world_size, device.type == "cuda")
            task = bar.add_task(phase.name, total=total, completed=state.step_in_phase, rate="")
            t0, seen = time.perf_counter(), 0
            student.train()
            while state.step_in_phase < total:
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine(state.step_in_phase, total, warmup, cfg.optim.min_lr_ratio, base=lr)
                epoch, samples, parts, grad_norm = optimizer_step(net, step, batches, optimizer, student, cfg.optim, ddp)
                if average is not None:
                    average.update(student)
                state.step_in_phase, state.global_step = state.step_in_phase + 1, state.global_step + 1
                state.samples += samples
                seen += samples
                bar.update(task, completed=state.step_in_phase, rate=rate_text(seen, time.perf_counter() - t0, "samples"))
                if state.global_step % cfg.run.log_every == 0 or state.step_in_phase == total:
                    losses = mean_over_ranks({"loss": sum(parts.values()), **{f"loss/{k}": v for k, v in parts.items()}},
                                             ddp, device)
                    metrics.log({"step": state.global_step, "phase": phase.name, "epoch": epoch,
                                 "lr": optimizer.param_groups[0]["lr"], **losses, "grad_norm": grad_norm,
                                 "samples_per_s": seen / (time.perf_counter() - t0)})
                stopping = stop.agreed(ddp, device)
                if stopping or state.global_step % cfg.run.checkpoint_every == 0:
                    save()
                if stopping:
                    metrics.close()
                    log.info("stopped at step %d on request; resume with --resume", state.global_step)
                    return {"stopped": True, **state.to_dict()}
            batches.close()
            state.phase, state.step_in_phase = p + 1, 0
            save()
    state.finished = True
    save()
    metrics.close()
    return {"stopped": False, **state.to_dict()}
