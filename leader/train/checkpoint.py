"""Checkpoints: everything a killed run needs to continue exactly where it was.

    Checkpoint(model=..., target_norm=..., ...).save("runs/demo")
    checkpoint = Checkpoint.load("runs/demo")
    student.load_state_dict(checkpoint.inference_weights())

`RUN/checkpoint.pt` holds the student (backbone and heads), the target normalisation, the
optimizer, the position (which segment of the schedule, how many steps into it; the data position
follows from it), the random states of every rank, the resolved config, the teachers' dimensions,
the cache's patch size, what the run was trained on, and the weight average if the run keeps one.
It is written to a temporary file and renamed, so a kill leaves the previous checkpoint intact, and
read with `torch.load(weights_only=True)`: only tensors and plain containers, nothing that executes
on load. `RUN/checkpoint.pt.sha256` records its digest (leader/checksums.py); every load (--resume,
embed, export, evaluation) checks the bytes against it first, so a damaged checkpoint is refused by
name instead of resuming from slightly wrong weights.
"""
from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from leader.checksums import read_verified, replace_with_sidecar
from leader.errors import LeaderError
from leader.io import atomic_write_bytes
from leader.precompute.teachers.checkpoints import load_error_reason

FORMAT = "leader-train/1"
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainState:
    segment: int = 0                # index into the run's schedule: (round, phase) passes in order
    step_in_segment: int = 0        # optimizer steps done in that segment
    global_step: int = 0            # optimizer steps done in the run
    samples: int = 0                # training tuples seen (all ranks)
    finished: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        # Runs saved before schedules had rounds counted phases; a sequential schedule's segments
        # are its phases, so those positions carry over as they are.
        d = dict(d)
        if "phase" in d:
            d["segment"], d["step_in_segment"] = d.pop("phase"), d.pop("step_in_phase")
        return cls(**d)


@dataclass
class Checkpoint:
    model: dict                     # the student's state dict (backbone.*, heads.<teacher>.*)
    target_norm: dict
    optimizer: dict
    state: TrainState
    rng: list                       # capture_rng() of every rank
    config: dict                    # the resolved TrainConfig, as a dict
    head_dims: dict                 # teacher -> target dimension
    patch_size: int                 # the side the caches cut patches at
    sources: dict                   # TrainingSources.describe(): shard sets, caches, teachers
    weight_average: dict | None = None     # WeightAverage.state_dict() when the run keeps one

    def inference_weights(self) -> dict:
        """The weights a run's embeddings come from: its weight average when it kept one."""
        return self.weight_average["weights"] if self.weight_average else self.model

    def save(self, run_dir: str | Path) -> Path:
        payload = {**{f.name: getattr(self, f.name) for f in fields(self)}, "state": self.state.to_dict()}
        return save_checkpoint(run_dir, payload)

    @classmethod
    def load(cls, run: str | Path) -> "Checkpoint":
        """The checkpoint of a run directory (or a checkpoint file given directly)."""
        payload = load_checkpoint(run)
        missing = [f.name for f in fields(cls) if f.name not in payload and f.name != "weight_average"]
        if missing:
            raise LeaderError(f"{checkpoint_path(run)} lacks {', '.join(missing)}: it is not a complete leader "
                              "training checkpoint")
        values = {f.name: payload.get(f.name) for f in fields(cls)}
        values["state"] = TrainState.from_dict(payload["state"])
        return cls(**values)


def capture_rng() -> dict:
    """This process's random states, as tensors and plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_tuples(state["python"]))


def _tuples(value):
    # random.setstate wants the tuples it gave; a round trip may hand back lists.
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(run_dir: str | Path, payload: dict) -> Path:
    """Atomically write RUN/checkpoint.pt (temporary file in the same directory, then rename)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    # Serialise in memory first: torch.save into a file turns a full disk into an opaque
    # "unexpected pos" error, while atomic_write_bytes names the file and says the old one is intact.
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    replace_with_sidecar(path, buf.getbuffer(), atomic_write_bytes)
    return path


def remove_interrupted_saves(run_dir: str | Path) -> None:
    """Temporary files left by a save that was killed (each as large as a checkpoint), and by its sidecar."""
    for tmp in Path(run_dir).glob(f".{CHECKPOINT_NAME}.*.tmp"):
        tmp.unlink(missing_ok=True)


def checkpoint_path(run: str | Path) -> Path:
    """The checkpoint of a run directory (or a checkpoint file given directly)."""
    run = Path(run)
    path = run if run.is_file() else run / CHECKPOINT_NAME
    if not path.is_file():
        raise LeaderError(f"{run} holds no checkpoint ({CHECKPOINT_NAME}); train a run there first")
    return path


def load_checkpoint(run: str | Path) -> dict:
    path = checkpoint_path(run)
    data = read_verified(path, "checkpoint")       # read once: checked, then unpickled from memory
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it rather than show the unpickler
        raise LeaderError(f"checkpoint {path} cannot be read: {load_error_reason(e)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LeaderError(f"{path} is not a leader training checkpoint (format {FORMAT})")
    return payload
