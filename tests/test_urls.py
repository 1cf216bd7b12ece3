"""Shards and caches named by fsspec URLs: the same code reads object storage and local disk.

`file://` URLs take the fsspec path through every reader (manifest, keys, tar shards, Zarr cache)
without needing a bucket; s3://, gs:// and az:// go through the same calls.
"""
from __future__ import annotations

from leader.precompute.cache import TeacherCache
from leader.shards.manifest import Manifest
from leader.shards.layout import iter_samples
from leader.train.loop import train
from tests.conftest import one_thread
from tests.test_train import config


def test_manifest_and_samples_load_from_a_url(phantom_shards):
    url = f"file://{phantom_shards}"
    manifest = Manifest.load(url)
    assert manifest.root == url and manifest.n_samples == 24
    assert str(manifest.path("shard-000000.tar")) == f"{url}/shard-000000.tar"
    assert sum(n for _, n in manifest.iter_keys()) == manifest.n_items
    local = [s.key for s in iter_samples(phantom_shards)]
    assert [s.key for s in iter_samples(url)] == local


def test_training_streams_shards_and_cache_from_urls(phantom_shards, train_cache, tmp_path):
    shards_url, cache_url = f"file://{phantom_shards}", f"file://{train_cache}"
    TeacherCache.open(cache_url).check_against(Manifest.load(shards_url))
    cfg = config(shards_url, cache_url, "phases.0.steps=2", "phases.1.steps=2", "data.batch_size=4")
    with one_thread():
        summary = train(cfg, tmp_path / "run")
    assert summary["finished"] and summary["global_step"] == 4
