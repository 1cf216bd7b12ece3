"""Checks every adapter makes: on its settings before reading anything, and on the files it reads."""
from __future__ import annotations

import json
from pathlib import Path

from leader.errors import LeaderError
from leader.shards.records import RejectLog

MISSING_IMAGE = "image file not found under --root"


def require_root(root: Path | str | None, message: str) -> Path:
    """--root as a Path, or one clear error (`message` says what the folder should hold)."""
    if root is None or not Path(root).is_dir():
        raise LeaderError(message)
    return Path(root)


def image_file(root: Path, relative: str, rejects: RejectLog) -> Path | None:
    """root/relative if that image file exists; else it is rejected, as missing, and None."""
    path = root / relative
    if path.is_file():
        return path
    rejects.add(relative, MISSING_IMAGE)
    return None


def read_json_file(path: Path, dataset: str, expected: str):
    """A dataset's JSON file, or one clear error: missing (`expected` says what --root should hold)
    or unreadable."""
    if not path.is_file():
        raise LeaderError(f"{dataset}: expected {path.name} in {path.parent}; is --root {expected}?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LeaderError(f"{dataset}: {path} is not valid JSON ({e})") from None


def check_val_fraction(dataset: str, value: float) -> float:
    """The share of training patients carved out as val where a dataset has no official val split."""
    if not 0.0 < value < 1.0:
        raise LeaderError(f"{dataset}: val_fraction must be between 0 and 1, got {value}")
    return float(value)
