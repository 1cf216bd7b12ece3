"""metrics.json: what every protocol writes into --out, and what `compare` and `report` read.

Common fields: `protocol`, `representation`, `shards`, `primary` (the headline metric's name),
`samples` ({"field", "over"}: the list of repeated measurements behind it, for t-tests),
`figures` ({name: file relative to the metrics.json}), then the protocol's own fields.
"""
from __future__ import annotations

import json
from pathlib import Path

from leader.errors import LeaderError
from leader.io import atomic_write_json

METRICS_NAME = "metrics.json"


def write_metrics(out: str | Path, metrics: dict) -> Path:
    path = Path(out) / METRICS_NAME
    atomic_write_json(path, metrics)
    return path


def load_metrics(path: str | Path) -> dict:
    """A metrics.json (or the directory holding one), checked for the common fields."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.exists():
        raise LeaderError(f"{path} not found: pass a {METRICS_NAME} written by `leader eval`")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LeaderError(f"{path} is not valid JSON: {e}") from None
    for field in ("protocol", "representation", "primary", "samples"):
        if field not in metrics:
            raise LeaderError(f"{path} lacks {field!r}: it is not a {METRICS_NAME} written by `leader eval`")
    metrics["_path"] = str(path)
    return metrics
