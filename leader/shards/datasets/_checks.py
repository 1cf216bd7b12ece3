"""Checks every adapter makes on its settings before reading anything."""
from __future__ import annotations

from pathlib import Path

from leader.errors import LeaderError


def require_root(root: Path | str | None, message: str) -> Path:
    """--root as a Path, or one clear error (`message` says what the folder should hold)."""
    if root is None or not Path(root).is_dir():
        raise LeaderError(message)
    return Path(root)


def check_val_fraction(dataset: str, value: float) -> float:
    """The share of training patients carved out as val where a dataset has no official val split."""
    if not 0.0 < value < 1.0:
        raise LeaderError(f"{dataset}: val_fraction must be between 0 and 1, got {value}")
    return float(value)
