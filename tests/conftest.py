"""Shared fixtures: small shard sets built once per test session.

Tests read as examples: they build what they need through the public functions, at toy sizes so
the whole suite runs in minutes on two CPU cores.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("LEADER_PROGRESS", "0")

import contextlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def build_phantom(out, n=24, size=64, shard_size=8, seed=0, **options):
    from leader.shards.builder import BuildSettings, build_shards

    settings = BuildSettings(dataset="phantom", size=size, shard_size=shard_size, seed=seed, n=n, options=options)
    return build_shards(settings, out)


@pytest.fixture(scope="session")
def phantom_shards(tmp_path_factory):
    """24 phantom images at 64 px in 3 shards: labels, boxes, patches and landmarks."""
    out = tmp_path_factory.mktemp("phantom") / "shards"
    build_phantom(out)
    return out


def tiny_teacher(tmp: Path, arch: str):
    """A timm teacher with random (seeded) weights saved as a real checkpoint file."""
    import timm
    import torch

    from leader.precompute.teachers import create_teacher

    torch.manual_seed(1)
    path = tmp / f"{arch}.pt"
    torch.save(timm.create_model(arch, num_classes=0).state_dict(), path)
    return create_teacher("timm", model=path, arch=arch, input_size=32)


@pytest.fixture(scope="session")
def train_cache(phantom_shards, tmp_path_factory):
    """disease (test_resnet, 96-d) and anatomy (test_convnext, 64-d), 2 views per item, patches at 32 px."""
    from leader.precompute.run import CacheLayout, Execution, precompute

    tmp = tmp_path_factory.mktemp("train-cache")
    with one_thread():
        for name, arch in (("disease", "test_resnet"), ("anatomy", "test_convnext")):
            precompute(phantom_shards, name, tiny_teacher(tmp, arch), tmp / "cache.zarr",
                       CacheLayout(views=2, patch_size=32), Execution(batch_size=64))
    return tmp / "cache.zarr"


@contextlib.contextmanager
def sigterm_when(condition):
    """SIGTERM this process as soon as condition() holds (checked from a thread), as a scheduler's
    pre-emption would; inside, a stray signal after the code under test returned does not end pytest."""
    import os
    import signal
    import threading
    import time

    def watch():
        while not condition():
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        threading.Thread(target=watch, daemon=True).start()
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: on shared CPUs two spinning OpenMP threads can run ten times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
