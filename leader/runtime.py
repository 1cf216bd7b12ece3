"""Process plumbing every long command shares: where this process stands in a torchrun job, how it
stops on SIGTERM, and how `key=value` settings from the command line are read.

    position = torchrun_position()                   # rank, world size, local rank from the environment
    with StopOnSigterm() as stop:                    # a scheduler's pre-emption sets stop.requested
        for unit in work:
            do(unit)
            if stop.requested:
                break                                # the unit is finished and recorded: exit 0
    options = parse_key_values(["arch=resnet50", "bits=16"])      # {"arch": "resnet50", "bits": 16}
"""
from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from leader.errors import LeaderError


@dataclass(frozen=True)
class TorchrunPosition:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def torchrun_position(rank: int | None = None, world_size: int | None = None) -> TorchrunPosition:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun (or any launcher) sets them; arguments win."""
    try:
        rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise LeaderError(f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} and "
                          f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} must be integers") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise LeaderError(f"rank {rank} is not within world size {world_size}")
    return TorchrunPosition(rank, world_size, local_rank)


def local_device(device: str) -> str:
    """`cuda` means this process's own GPU under torchrun: cuda:<LOCAL_RANK>."""
    return f"cuda:{torchrun_position().local_rank}" if device == "cuda" else device


class StopOnSigterm:
    """SIGTERM (a scheduler's pre-emption) sets `requested`; the job finishes the unit it is in,
    records it and returns, so that rerunning the same command resumes. Outside the main thread no
    handler can be installed, and the job simply runs to the end."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: Any = None
        self._installed = False

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def __enter__(self) -> "StopOnSigterm":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self._event.set()

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def ignore_sigterm() -> None:
    """For worker processes: the scheduler signals the whole process group, and the main process
    still needs its workers to finish the unit in progress."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def parse_key_values(pairs: list[str], flag: str = "--option") -> dict:
    """`key=value` pairs; values are read as YAML scalars, so numbers, booleans and lists arrive typed."""
    options = {}
    for pair in pairs:
        key, value = split_key_value(pair, flag)
        options[key] = value
    return options


def split_key_value(pair: str, flag: str) -> tuple[str, Any]:
    """One `key=value`, its value read as YAML (a value YAML cannot read stays the string)."""
    import yaml

    key, sep, text = pair.partition("=")
    if not sep or not key:
        raise LeaderError(f"{flag} {pair!r} is not key=value")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError:
        return key, text
