"""The learning-rate schedule every trainer here uses: linear warm-up, then cosine decay.

    for group in optimizer.param_groups:
        group["lr"] = warmup_cosine(step, total, warmup, min_ratio=0.01, base=2e-4)
"""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0, base: float = 1.0) -> float:
    """The rate at `step` (0-based) of `total`: base * (step + 1) / warmup during the warm-up, then a
    cosine from base that would reach base * min_ratio at step `total`, one past the last. With base
    1 it is a factor."""
    warmup = min(warmup, total)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
