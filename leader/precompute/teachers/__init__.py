"""Teachers by name, in the style of timm's model registry.

    teacher = create_teacher("adam", model="adam_v2.pth", device="cuda", arch="convnext_base")

Teacher kinds are discovered the way dataset adapters are: every module of this package is imported
on first use (`load_all`), and each registers its kinds, so a new kind is one new module. Importing
the package itself costs nothing: the trainer may import it for names without pulling in timm, and
TensorFlow is only ever imported inside `cxr_foundation`'s functions.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

from leader.errors import LeaderError
from leader.precompute.teachers.base import Teacher
from leader.registry import Registry

TEACHERS: Registry[Teacher] = Registry("teacher")
register_teacher = TEACHERS.register

def load_all() -> list[str]:
    """Import every module of this package so that each teacher kind registers itself; returns the
    registered kinds."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return TEACHERS.names()


def create_teacher(kind: str, model: str | Path | None = None, device: str = "cpu",
                   allow_remote: bool = False, **options: Any) -> Teacher:
    load_all()
    factory = TEACHERS.get(kind)
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    if "trust_model" in unknown:
        raise LeaderError(f"--trust-model applies to TensorFlow SavedModels (kind cxr-foundation); teacher {kind!r} "
                          "loads tensors only, with nothing to trust")
    if unknown:
        known = sorted(p for p in accepted if p not in ("self", "model", "device", "allow_remote"))
        raise LeaderError(f"teacher {kind!r} has no option {', '.join(unknown)}; its options: {', '.join(known) or 'none'}")
    return factory(model, device=device, allow_remote=allow_remote, **options)


__all__ = ["TEACHERS", "Teacher", "create_teacher", "load_all", "register_teacher"]
