"""The trainer's configuration: one dataclass tree, read from YAML, overridden with `--set key=value`.

    cfg = load_config("configs/demo.yaml", overrides=["optim.lr=1e-3", "phases.0.steps=50"])
    cfg.phases[0].branches          # ["disease"]

The resolved config (file + overrides + command-line shards) is saved in the run directory as
`config.yaml`; `--resume` reads it back and refuses a change that would make the resumed run a
different run (see `resume_conflicts`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from leader.errors import LeaderError
from leader.io import atomic_write_text, read_yaml_mapping
from leader.network_input import IMAGENET_MEAN, IMAGENET_STD
from leader.runtime import split_key_value

TARGET_NORMS = ("l2", "standardize", "none")
STREAMS = ("images", "pairs")
HEADS = ("mlp", "dino")
LOSSES = ("mse", "cross_entropy")


@dataclass
class ModelConfig:
    name: str = "swin_base_patch4_window7_224"   # any timm model; built with num_classes=0
    image_size: int = 224                         # the student's input resolution
    in_chans: int = 3                             # 3: grayscale replicated; 1: a one-channel stem
    kwargs: dict = field(default_factory=dict)    # extra timm.create_model arguments (img_size, depth, ...)
    pretrained_file: str | None = None            # local timm weights to start from (never downloaded)
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    head: str = "mlp"                             # "mlp": the paper's Linear-GELU-Linear; "dino": the authors' code's head
    head_hidden: int = 2048                       # hidden width of each head
    head_layers: int = 2                          # dino only: layers of its MLP before the bottleneck (the code's flag)
    head_bottleneck: int = 256                    # dino only: the normalised bottleneck before the last layer


@dataclass
class DataConfig:
    shards: list = field(default_factory=list)    # shard-set directories (or URLs), one per dataset
    caches: list = field(default_factory=list)    # one cache per shard set; empty: <shards>/cache.zarr
    splits: list = field(default_factory=lambda: ["train"])
    batch_size: int = 64                          # per rank, per micro-batch
    num_workers: int = 4
    shuffle_buffer: int = 2000                    # training tuples held for shuffling, per worker
    online_augment: bool = True                   # audit-approved augmentations where only view 0 is cached
    skip_damaged_shards: bool = False             # a shard unlike its manifest's sha256: skip it (logged), not stop


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 500
    warmup_fraction: float | None = None          # warm-up as a fraction of the scheduled steps (wins over warmup_steps)
    min_lr_ratio: float = 0.01                    # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0                        # max global grad norm; 0 turns clipping off
    grad_accum: int = 1                           # micro-batches per optimizer step
    ema_decay: float = 0.0                        # > 0: keep an average of the weights; embed/export use it
    fused: bool | None = None                     # AdamW's fused kernel; None: on CUDA (foreach elsewhere)


@dataclass
class LossConfig:
    """What each branch minimises between its head's output and the teacher's target.

    mse: the paper's mean squared error (after target_norm).
    cross_entropy: the paper's Fig. 10 alternative, H(softmax(t / teacher_temperature),
    softmax(s / student_temperature)) over the embedding dimensions, on the target_norm-ed vectors.
    """

    kind: str = "mse"
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04


@dataclass
class ScheduleConfig:
    """How the phases follow each other, and the learning rate over them.

    rounds 0 (sequential): each phase runs all its epochs/steps before the next, and the learning
    rate warms up and decays within each phase.
    rounds R >= 1 (Algorithm 1): R rounds, each one pass of every phase in order, where a phase's
    epochs/steps are per pass (a pass may be a fraction of an epoch); one warm-up and one cosine
    decay span the whole run.
    """

    rounds: int = 0


@dataclass
class PhaseConfig:
    """One phase of Algorithm 1: which data, which stream, which branches, how long."""

    name: str = "phase"
    stream: str = "images"                        # "images": whole images; "pairs": (image, patch) pairs
    datasets: Any = "all"                         # "all", "with_boxes", or a list of dataset names
    branches: list = field(default_factory=lambda: ["disease"])
    epochs: float | None = None                   # give epochs or steps (optimizer steps)
    steps: int | None = None
    lr: float | None = None                       # None: optim.lr (sequential schedule only)
    warmup_steps: int | None = None               # None: optim.warmup_steps (sequential schedule only)


@dataclass
class RunConfig:
    device: str = "auto"                          # "auto": cuda:<LOCAL_RANK> when available, else cpu
    precision: str = "bf16"                       # "bf16" autocast on CUDA; "fp32" everywhere
    channels_last: bool = True
    compile: bool = False
    log_every: int = 20
    checkpoint_every: int = 1000
    tensorboard: bool = True


@dataclass
class TrainConfig:
    seed: int = 0
    target_norm: str = "l2"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    phases: list = field(default_factory=list)    # list[PhaseConfig]
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def teachers(self) -> list[str]:
        """Every teacher some phase trains a head for, in first-use order."""
        names: list[str] = []
        for phase in self.phases:
            names += [b for b in phase.branches if b not in names]
        return names


# ---------------------------------------------------------------------------------------------
# Reading


def config_from_dict(d: dict, where: str = "config") -> TrainConfig:
    cfg = _build(TrainConfig, d, where)
    cfg.phases = [_build(PhaseConfig, p, f"{where}: phases.{i}") for i, p in enumerate(cfg.phases or [])]
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = (), *,
                shards: list[str] | None = None, caches: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, then command-line shards/caches."""
    d = read_yaml_mapping(path, "config file") if path is not None else {}
    d = _merged(_plain(dataclasses.asdict(TrainConfig())), d)
    for item in overrides:
        apply_override(d, item)
    if shards:
        d.setdefault("data", {})["shards"] = [str(s) for s in shards]
    if caches:
        d.setdefault("data", {})["caches"] = [str(c) for c in caches]
    return config_from_dict(d, str(path) if path else "config")


def _merged(defaults: dict, given: dict) -> dict:
    """The defaults with the given values laid over them, section by section."""
    out = dict(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(d: dict, item: str) -> None:
    """`a.b.c=value` (list items by index: `phases.1.steps=10`); the value is read as YAML."""
    key, value = split_key_value(item, "--set")
    parts = key.split(".")
    node: Any = d
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise LeaderError(f"--set {key}: {'.'.join(parts[:depth]) or 'config'} has no item {part!r} "
                                  f"(it holds {len(node)})")
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node and not _open_mapping(parts[:depth]):
                raise LeaderError(f"--set {key}: unknown key {part!r}; known here: {', '.join(sorted(node))}")
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise LeaderError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section")


def _open_mapping(path: list[str]) -> bool:
    # model.kwargs takes any timm argument; phases may omit optional keys.
    return path == ["model", "kwargs"] or (len(path) == 2 and path[0] == "phases")


def validate(cfg: TrainConfig) -> None:
    if cfg.target_norm not in TARGET_NORMS:
        raise LeaderError(f"target_norm must be one of {', '.join(TARGET_NORMS)}, got {cfg.target_norm!r}")
    if cfg.model.in_chans not in (1, 3):
        raise LeaderError(f"model.in_chans must be 1 or 3, got {cfg.model.in_chans}")
    if len(cfg.model.mean) != 3 or len(cfg.model.std) != 3:
        raise LeaderError("model.mean and model.std must hold 3 values (one per RGB channel)")
    for name in ("image_size", "head_hidden"):
        if int(getattr(cfg.model, name)) < 1:
            raise LeaderError(f"model.{name} must be positive")
    if int(cfg.data.batch_size) < 1:
        raise LeaderError("data.batch_size must be positive")
    unknown_splits = [s for s in cfg.data.splits if s not in ("train", "val", "test")]
    if unknown_splits or not cfg.data.splits:
        raise LeaderError(f"data.splits must name some of train, val, test; got {cfg.data.splits}")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise LeaderError(f"optim.ema_decay must be 0 (off) or in (0, 1), got {cfg.optim.ema_decay}")
    if cfg.optim.grad_accum < 1:
        raise LeaderError("optim.grad_accum must be at least 1")
    if cfg.model.head not in HEADS:
        raise LeaderError(f"model.head must be one of {', '.join(HEADS)}, got {cfg.model.head!r}")
    if cfg.model.head == "dino" and not 1 <= cfg.model.head_layers <= 8:
        raise LeaderError(f"model.head_layers must be between 1 and 8, got {cfg.model.head_layers}")
    if cfg.loss.kind not in LOSSES:
        raise LeaderError(f"loss.kind must be one of {', '.join(LOSSES)}, got {cfg.loss.kind!r}")
    if cfg.loss.student_temperature <= 0 or cfg.loss.teacher_temperature <= 0:
        raise LeaderError("loss temperatures must be positive")
    if cfg.optim.warmup_fraction is not None and not 0.0 <= cfg.optim.warmup_fraction < 1.0:
        raise LeaderError(f"optim.warmup_fraction must be in [0, 1), got {cfg.optim.warmup_fraction}")
    if cfg.schedule.rounds < 0:
        raise LeaderError(f"schedule.rounds must be 0 (sequential phases) or a number of rounds, got {cfg.schedule.rounds}")
    if cfg.run.precision not in ("bf16", "fp32"):
        raise LeaderError(f"run.precision must be bf16 or fp32, got {cfg.run.precision!r}")
    if not cfg.phases:
        raise LeaderError("the config defines no phases; Algorithm 1 needs at least one (see configs/leader-swinb.yaml)")
    names = [p.name for p in cfg.phases]
    if len(set(names)) != len(names):
        raise LeaderError(f"phase names must be distinct, got {names}")
    for i, p in enumerate(cfg.phases):
        where = f"phases.{i} ({p.name})"
        if p.stream not in STREAMS:
            raise LeaderError(f"{where}: stream must be one of {', '.join(STREAMS)}, got {p.stream!r}")
        if not p.branches:
            raise LeaderError(f"{where}: branches is empty; name the teachers this phase trains")
        if (p.epochs is None) == (p.steps is None):
            raise LeaderError(f"{where}: give exactly one of epochs and steps")
        if (p.steps is not None and p.steps < 1) or (p.epochs is not None and p.epochs <= 0):
            raise LeaderError(f"{where}: epochs/steps must be positive")
        if not (p.datasets in ("all", "with_boxes") or isinstance(p.datasets, list)):
            raise LeaderError(f"{where}: datasets must be 'all', 'with_boxes' or a list of dataset names")
        if cfg.schedule.rounds and (p.lr is not None or p.warmup_steps is not None):
            raise LeaderError(f"{where}: lr and warmup_steps per phase belong to the sequential schedule; with "
                              f"schedule.rounds one learning-rate curve spans the run (set optim.lr, optim.warmup_*)")
    if cfg.data.caches and len(cfg.data.caches) != len(cfg.data.shards):
        raise LeaderError(f"data.caches lists {len(cfg.data.caches)} caches for {len(cfg.data.shards)} shard sets; "
                          "give one cache per shard set, or none to use <shards>/cache.zarr")


def _build(cls, d: Any, where: str):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise LeaderError(f"{where}: expected a mapping for {cls.__name__}, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise LeaderError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    values = {}
    for name, value in d.items():
        sub = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "loss": LossConfig,
               "schedule": ScheduleConfig, "run": RunConfig}.get(name)
        if cls is TrainConfig and sub is not None:
            value = _build(sub, value, f"{where}: {name}")
        elif isinstance(value, list) and name in ("mean", "std", "betas"):
            value = tuple(value)
        else:
            value = _typed(value, known[name].type, f"{where}: {name}")
        values[name] = value
    return cls(**values)


def _typed(value: Any, annotation: str, where: str) -> Any:
    """A scalar as its field's type says. YAML 1.1 reads `5e-4` (no dot) as a string, so a
    `--set optim.lr=5e-4` arrives as "5e-4"; numbers written that way are accepted, and a value of
    the wrong kind is named here instead of failing deep inside torch."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise LeaderError(f"{where}: a value is required")
    if "float" in kinds and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise LeaderError(f"{where}: expected a number, got {value!r}")
    if "int" in kinds:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise LeaderError(f"{where}: expected a whole number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise LeaderError(f"{where}: expected a whole number, got {value!r}") from None
        if not number.is_integer():
            raise LeaderError(f"{where}: expected a whole number, got {value!r}")
        return int(number)
    if "bool" in kinds and not isinstance(value, bool):
        raise LeaderError(f"{where}: expected true or false, got {value!r}")
    if "str" in kinds and not isinstance(value, str):
        raise LeaderError(f"{where}: expected a string, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what YAML writes and reads back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Saving and resuming

CONFIG_NAME = "config.yaml"

# Keys whose change on --resume still continues the same run: where the output goes, how fast the
# machine works, what is logged. Anything else would make the resumed run a different run.
OPERATIONAL_KEYS = ("run.device", "run.compile", "run.log_every", "run.checkpoint_every", "run.tensorboard",
                    "data.shards", "data.caches")
MODEL_KEYS = ("model.", "target_norm")


def save_config(cfg: TrainConfig, run_dir: str | Path) -> Path:
    path = Path(run_dir) / CONFIG_NAME
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and any(isinstance(v, dict) for v in d):
        out = {}
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
        out[f"{prefix}len"] = len(d)
        return out
    return {prefix[:-1]: d}


def resume_conflicts(saved: dict, now: dict) -> list[str]:
    """Messages for each key whose change would make `--resume` continue a different run."""
    a, b = flatten(saved), flatten(now)
    problems = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or key.startswith(OPERATIONAL_KEYS):
            continue
        why = "it alters the model" if key.startswith(MODEL_KEYS) else "it changes the data or optimisation of the run"
        problems.append(f"config key {key} changed ({a.get(key)!r} -> {b.get(key)!r}): {why}")
    return problems
