"""Training metrics: one JSON line per logged step in RUN/metrics.jsonl, mirrored to TensorBoard.

A resumed run first drops the lines past its checkpoint (the killed run may have logged steps it
never saved), so metrics.jsonl always reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

from leader.errors import LeaderError
from leader.io import DISK_FULL, atomic_write_text

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut by a kill
            break
    return rows


def summary_writer(log_dir: Path, purge_step: int | None = None):
    """TensorBoard's writer without TensorFlow.

    tensorboard imports TensorFlow for file access when it can, and the trainer must never import
    it (slow, and it may fight torch over the process). A `tensorboard.compat.notf` module is
    tensorboard's own switch to its built-in stub.
    """
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides events a killed run logged past the checkpoint it is resumed from.
    return SummaryWriter(str(log_dir), purge_step=purge_step)


class MetricsLog:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_NAME
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            self.writer = summary_writer(Path(run_dir) / TENSORBOARD_DIR,
                                         None if resume_step is None else resume_step + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            raise LeaderError(f"{DISK_FULL[e.errno]} while appending step {row.get('step')} to {self.path}; "
                              "the last checkpoint is intact. Free some space and rerun with --resume") from e
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
