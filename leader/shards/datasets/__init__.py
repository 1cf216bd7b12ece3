"""Dataset adapters, registered by name: `leader shards build NAME` looks them up here."""
from __future__ import annotations

import importlib
import pkgutil

from leader.registry import Registry

DATASETS: Registry = Registry("dataset")
register_dataset = DATASETS.register


def load_all() -> None:
    """Import every adapter module so that each registers itself."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def create_dataset(name: str):
    load_all()
    return DATASETS.create(name)
