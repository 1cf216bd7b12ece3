"""Shared fixtures: small shard sets built once per test session.

Tests read as examples: they build what they need through the public functions, at toy sizes so
the whole suite runs in minutes on two CPU cores.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("LEADER_PROGRESS", "0")

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
