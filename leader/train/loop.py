"""The training loop: Algorithm 1's schedule, one screen, no framework in between.

    summary = train(load_config("configs/demo.yaml", shards=["shards/phantom"]), "runs/demo")

The schedule is a list of segments, each one pass of one phase (`schedule_segments`): the phases in
order, each run to its end (sequential), or R rounds of one pass of every phase (Algorithm 1's
rounds, `schedule.rounds`). A `Trainer` holds the student and what one optimizer step needs; the
loop walks the segments, sets the learning rate, steps, logs and checkpoints.

Runs as one process or under `torchrun` (DDP; gloo on CPU, nccl on GPU). Rank 0 writes the run
directory: config.yaml, metrics.jsonl, tensorboard/, train.log and checkpoint.pt. SIGTERM (a
scheduler's pre-emption) finishes the current step, writes a checkpoint and returns normally, so the
command exits 0 and `--resume` continues exactly.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leader.errors import LeaderError
from leader.progress import progress, rate_text
from leader.runtime import StopOnSigterm, TorchrunPosition, local_device, torchrun_position
from leader.schedule import warmup_cosine
from leader.train.averaging import WeightAverage
from leader.train.checkpoint import (CHECKPOINT_NAME, Checkpoint, TrainState, capture_rng, remove_interrupted_saves,
                                     restore_rng)
from leader.train.config import OptimConfig, TrainConfig, resume_conflicts, save_config
from leader.train.loader import StreamSpec, phase_batches
from leader.train.metrics import MetricsLog
from leader.train.model import Student, TargetNorm, create_student
from leader.train.sources import TrainingSources, open_sources
from leader.train.step import DistillationStep, StudentInput

log = logging.getLogger("leader.train")


# ---------------------------------------------------------------------------------------------
# Where this process runs


@dataclass(frozen=True)
class Distributed:
    position: TorchrunPosition = TorchrunPosition()
    owns_group: bool = False          # this run joined the process group, so it leaves it too

    rank = property(lambda self: self.position.rank)
    world_size = property(lambda self: self.position.world_size)
    main = property(lambda self: self.position.main)
    active = property(lambda self: self.position.distributed)


def setup_distributed(device_kind: str) -> Distributed:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...)."""
    position = torchrun_position()
    if not position.distributed:
        return Distributed(position)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Distributed(TorchrunPosition(dist.get_rank(), dist.get_world_size(), position.local_rank), owns_group)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise LeaderError("run.device is cuda but no CUDA device is available")
    return torch.device(local_device(setting))


# ---------------------------------------------------------------------------------------------
# The schedule


@dataclass(frozen=True)
class Segment:
    """One pass of one phase."""

    round: int                        # 0 for the sequential schedule
    phase: int                        # index into cfg.phases
    steps: int                        # optimizer steps of this pass
    first_step: int                   # the phase's steps in earlier passes: where its data stream stands


def schedule_segments(cfg: TrainConfig, specs: list[StreamSpec]) -> list[Segment]:
    """The run's passes in order. A phase's epochs (or steps) are its whole length in the sequential
    schedule and the length of each pass with rounds."""
    per_pass = [phase.steps or max(1, math.ceil(phase.epochs * spec.batches_per_epoch / cfg.optim.grad_accum))
                for phase, spec in zip(cfg.phases, specs)]
    done = [0] * len(cfg.phases)
    segments = []
    for r in range(max(1, cfg.schedule.rounds)):
        for p, steps in enumerate(per_pass):
            segments.append(Segment(r, p, steps, done[p]))
            done[p] += steps
    return segments


def learning_rate(cfg: TrainConfig, segments: list[Segment], state: TrainState) -> float:
    """With rounds, one warm-up and cosine over the whole run; sequentially, one per phase."""
    if cfg.schedule.rounds:
        total = sum(s.steps for s in segments)
        return warmup_cosine(state.global_step, total, warmup_steps(cfg.optim, total), cfg.optim.min_lr_ratio,
                             base=cfg.optim.lr)
    segment = segments[state.segment]
    phase = cfg.phases[segment.phase]
    warmup = warmup_steps(cfg.optim, segment.steps) if phase.warmup_steps is None else phase.warmup_steps
    return warmup_cosine(state.step_in_segment, segment.steps, warmup, cfg.optim.min_lr_ratio,
                         base=phase.lr or cfg.optim.lr)


def warmup_steps(optim: OptimConfig, total: int) -> int:
    return round(optim.warmup_fraction * total) if optim.warmup_fraction is not None else optim.warmup_steps


# ---------------------------------------------------------------------------------------------
# The student and one optimizer step


def make_optimizer(student: Student, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over every parameter; biases and norm weights take no weight decay. On CUDA the fused
    kernel (one launch for all parameters); elsewhere torch's default, unless optim.fused says.

    Heads a phase does not train get no gradient, and AdamW leaves them (and their state) alone.
    """
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **({"fused": True} if fused else {}))


@dataclass
class StepResult:
    epoch: int
    samples: int                      # training tuples of this step, all ranks
    losses: dict[str, torch.Tensor]   # on the device: read them only when logging
    grad_norm: torch.Tensor


class Trainer:
    """The student with everything an optimizer step needs: target normalisation, AdamW, the
    distillation step and the weight average. `leader train` runs it; the benchmarks time it."""

    def __init__(self, cfg: TrainConfig, head_dims: dict[str, int], patch_size: int, device: torch.device,
                 stats: dict | None = None):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)                                 # the same initial weights on every rank
        self.student = create_student(cfg.model, head_dims).to(device)
        self.norm = TargetNorm(cfg.target_norm, head_dims, stats).to(device)
        if cfg.run.channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.student, cfg.optim, device)
        self.average = WeightAverage.start(self.student, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        autocast = torch.bfloat16 if device.type == "cuda" and cfg.run.precision == "bf16" else None
        self.step = DistillationStep(StudentInput.from_config(cfg.model, patch_size, cfg.run.channels_last), self.norm,
                                     device, autocast, cfg.loss)
        self._nets: dict[tuple[str, ...], nn.Module] = {}

    def restore(self, checkpoint: Checkpoint) -> None:
        self.student.load_state_dict(checkpoint.model)
        self.norm.load_state_dict(checkpoint.target_norm)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        if self.average is not None and checkpoint.weight_average:
            self.average = WeightAverage.resume(checkpoint.weight_average, self.student, self.cfg.optim.ema_decay)

    def net(self, branches: list[str], ddp: Distributed) -> nn.Module:
        """The backbone and the given heads, as DDP and torch.compile see them; one per branch set,
        so that alternating phases neither rewrap nor recompile."""
        key = tuple(branches)
        if key not in self._nets:
            net: nn.Module = self.student.restricted(branches)
            if ddp.active:
                net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.cfg.run.compile:
                net = torch.compile(net)
            self._nets[key] = net
        return self._nets[key]

    def optimizer_step(self, net: nn.Module, batches: Iterator, ddp: Distributed) -> StepResult:
        """grad_accum micro-batches, clipping, one AdamW step, the weight average. Nothing waits for
        the device: losses and the gradient norm stay there until someone logs them."""
        accum, samples, losses = self.cfg.optim.grad_accum, 0, {}
        for micro in range(accum):
            epoch, batch = next(batches)
            # DDP all-reduces gradients on backward; the micro-batches before the last only accumulate.
            quiet = ddp.active and micro < accum - 1 and hasattr(net, "no_sync")
            with net.no_sync() if quiet else contextlib.nullcontext():
                loss, parts = self.step(net, batch)
                (loss / accum).backward()
            for k, v in parts.items():
                losses[k] = losses.get(k, 0.0) + v.detach() / accum
            samples += len(batch["keys"]) * ddp.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update(self.student)
        return StepResult(epoch, samples, losses, grad_norm)

    def checkpoint(self, state: TrainState, rng: list, head_dims: dict, patch_size: int, sources: dict) -> Checkpoint:
        return Checkpoint(model=self.student.state_dict(), target_norm=self.norm.state_dict(),
                          optimizer=self.optimizer.state_dict(), state=state, rng=rng, config=self.cfg.to_dict(),
                          head_dims=head_dims, patch_size=patch_size, sources=sources,
                          weight_average=self.average.state_dict() if self.average is not None else None)


# ---------------------------------------------------------------------------------------------
# The run


def prepare_run(cfg: TrainConfig, out: Path, resume: bool, ddp: Distributed) -> Checkpoint | None:
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
    checkpoint = Checkpoint.load(out)
    conflicts = resume_conflicts(checkpoint.config, cfg.to_dict())
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


def check_same_inputs(checkpoint: Checkpoint, sources: TrainingSources, head_dims: dict[str, int]) -> None:
    """--resume continues on the data and teachers it started with (shard paths may move)."""
    if checkpoint.head_dims != head_dims:
        raise LeaderError(f"--resume: the caches' teacher dimensions {head_dims} differ from the run's heads "
                          f"{checkpoint.head_dims}")
    before, now = checkpoint.sources, sources.describe()
    for a, b in zip(before["shard_sets"], now["shard_sets"]):
        if (a["dataset"], a["manifest_fingerprint"]) != (b["dataset"], b["manifest_fingerprint"]):
            raise LeaderError(f"--resume: shard set {b['root']} ({b['dataset']}) is not the one the run started on "
                              f"({a['root']}, {a['dataset']}, manifest {a['manifest_fingerprint'][:12]}...)")
    for name, info in now["teachers"].items():
        if before["teachers"].get(name, {}).get("fingerprint") != info["fingerprint"]:
            raise LeaderError(f"--resume: teacher {name!r} in the caches was computed with other weights than the "
                              f"run's targets (sha256 {info['fingerprint'][:12]}...)")


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


def stop_agreed(stop: StopOnSigterm, ddp: Distributed, device: torch.device) -> bool:
    """Every rank stops at the same step, whichever of them got the signal (one all-reduce)."""
    if not ddp.active:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


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


def _train(cfg: TrainConfig, out: Path, sources: TrainingSources, checkpoint: Checkpoint | None, ddp: Distributed,
           device: torch.device) -> dict:
    head_dims = {t: sources.teachers[t].dim for t in cfg.teachers()}
    stats = {t: sources.pooled_stats(t) for t in head_dims} if cfg.target_norm == "standardize" else None
    patch_size = sources.patch_size()
    trainer = Trainer(cfg, head_dims, patch_size, device, stats)
    state = TrainState()
    if checkpoint is not None:
        check_same_inputs(checkpoint, sources, head_dims)
        trainer.restore(checkpoint)
        state = checkpoint.state
        rngs = checkpoint.rng
        restore_rng(rngs[ddp.rank] if len(rngs) == ddp.world_size else rngs[0])
    else:
        torch.manual_seed(cfg.seed + ddp.rank)                      # ranks differ from here on (dropout, drop-path)
    specs = [StreamSpec.for_phase(sources, phase, cfg, ddp.world_size) for phase in cfg.phases]
    segments = schedule_segments(cfg, specs)
    metrics = MetricsLog(out, ddp.main, cfg.run.tensorboard, state.global_step if checkpoint is not None else None)
    accum = cfg.optim.grad_accum
    streams: dict[int, Iterator] = {}                               # live data stream per phase

    def save() -> None:
        rng = gather_rng(ddp)
        if ddp.main:
            trainer.checkpoint(state, rng, head_dims, patch_size, sources.describe()).save(out)

    def stream(segment: Segment) -> Iterator:
        if segment.phase not in streams:
            start = (segment.first_step + state.step_in_segment) * accum
            streams[segment.phase] = phase_batches(specs[segment.phase], start, ddp.rank, ddp.world_size,
                                                   device.type == "cuda")
        return streams[segment.phase]

    try:
        with StopOnSigterm() as stop, progress("steps") as bar:
            task = bar.add_task("train", total=sum(s.steps for s in segments), completed=state.global_step, rate="")
            t0, seen = time.perf_counter(), 0
            trainer.student.train()
            while state.segment < len(segments):
                segment = segments[state.segment]
                phase = cfg.phases[segment.phase]
                where = f"round {segment.round + 1}/{cfg.schedule.rounds} {phase.name}" if cfg.schedule.rounds else phase.name
                log.info("%s: %s on %d tuples/epoch, %d optimizer steps (%d per epoch), branches %s", where,
                         phase.stream, specs[segment.phase].tuples_per_epoch, segment.steps,
                         specs[segment.phase].batches_per_epoch // accum, phase.branches)
                bar.update(task, description=where)
                net, batches = trainer.net(phase.branches, ddp), stream(segment)
                while state.step_in_segment < segment.steps:
                    lr = learning_rate(cfg, segments, state)
                    for group in trainer.optimizer.param_groups:
                        group["lr"] = lr
                    result = trainer.optimizer_step(net, batches, ddp)
                    state.step_in_segment, state.global_step = state.step_in_segment + 1, state.global_step + 1
                    state.samples += result.samples
                    seen += result.samples
                    bar.update(task, completed=state.global_step, rate=rate_text(seen, time.perf_counter() - t0, "samples"))
                    at_log = state.global_step % cfg.run.log_every == 0 or state.step_in_segment == segment.steps
                    if at_log:
                        parts = {k: float(v) for k, v in result.losses.items()}
                        losses = mean_over_ranks({"loss": sum(parts.values()), **{f"loss/{k}": v for k, v in parts.items()}},
                                                 ddp, device)
                        metrics.log({"step": state.global_step, "phase": phase.name, "round": segment.round,
                                     "epoch": result.epoch, "lr": lr, **losses, "grad_norm": float(result.grad_norm),
                                     "samples_per_s": seen / (time.perf_counter() - t0)})
                    # One process reads its own flag for free; ranks agree at log steps only, as an
                    # all-reduce per step would wait for the device every step.
                    stopping = stop_agreed(stop, ddp, device) if (at_log or not ddp.active) else False
                    if stopping or state.global_step % cfg.run.checkpoint_every == 0:
                        save()
                    if stopping:
                        log.info("stopped at step %d on request; resume with --resume", state.global_step)
                        return {"stopped": True, **state.to_dict()}
                if all(s.phase != segment.phase for s in segments[state.segment + 1:]):
                    streams.pop(segment.phase).close()
                state.segment, state.step_in_segment = state.segment + 1, 0
                save()
        state.finished = True
        save()
        return {"stopped": False, **state.to_dict()}
    finally:
        metrics.close()
        for batches in streams.values():
            batches.close()
