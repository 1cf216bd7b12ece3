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


def create_dataset(name: str, **options):
    load_all()
    try:
        return DATASETS.create(name, **options)
    except TypeError as e:
        from leader.errors import LeaderError

        raise LeaderError(f"dataset {name!r} does not take these options {sorted(options)}: {e}") from None
