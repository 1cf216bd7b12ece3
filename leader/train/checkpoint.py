"""Checkpoints: everything a killed run needs to continue exactly where it was.

`RUN/checkpoint.pt` holds the student (backbone and heads), the target normalisation, the
optimizer, the position (phase, step within the phase; the data position follows from it), the
random states of every rank and the resolved config. It is written to a temporary file and renamed,
so a kill leaves the previous checkpoint intact, and read with `torch.load(weights_only=True)`:
only tensors and plain containers, nothing that executes on load.
"""
from __future__ import annotations

import io
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from leader.errors import LeaderError
from leader.io import atomic_write_bytes
from leader.precompute.teachers.checkpoints import load_error_reason

FORMAT = "leader-train/1"
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainState:
    phase: int = 0                  # index into config.phases
    step_in_phase: int = 0          # optimizer steps done in that phase
    global_step: int = 0            # optimizer steps done in the run
    samples: int = 0                # training tuples seen (all ranks)
    finished: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


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
    atomic_write_bytes(path, buf.getbuffer())
    return path


def remove_interrupted_saves(run_dir: str | Path) -> None:
    """Temporary files left by a save that was killed (each as large as a checkpoint)."""
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
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it rather than show the unpickler
        raise LeaderError(f"checkpoint {path} cannot be read: {load_error_reason(e)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LeaderError(f"{path} is not a leader training checkpoint (format {FORMAT})")
    return payload
