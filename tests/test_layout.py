"""The item layout: keys, cache location and shard members, as every stage reads them."""
from pathlib import Path

import pytest

from leader.errors import LeaderError
from leader.shards.layout import default_cache_path, item_keys, iter_shard, member_key


def test_items_are_the_image_then_its_patches():
    assert item_keys("nih14/00000001_000", 2) == ["nih14/00000001_000", "nih14/00000001_000#p0", "nih14/00000001_000#p1"]
    assert item_keys("nih14/x", 0) == ["nih14/x"]


def test_the_cache_sits_beside_local_and_remote_shards():
    assert default_cache_path(Path("/data/shards/nih14")) == Path("/data/shards/nih14/cache.zarr")
    assert default_cache_path("s3://bucket/shards/nih14/") == "s3://bucket/shards/nih14/cache.zarr"


def test_a_dot_in_the_dataset_name_stays_in_the_sample_key():
    assert member_key("nih14.v2/00000001_000.json") == ("nih14.v2/00000001_000", "json")
    assert member_key("nih14.v2/00000001_000.mask.png") == ("nih14.v2/00000001_000", "mask.png")


def test_a_stray_member_names_the_shard(tmp_path):
    import io
    import tarfile

    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("set/a.json", "set/a.png", "set/a.txt"):
            info = tarfile.TarInfo(name)
            data = b"{}" if name.endswith("json") else b"x"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(LeaderError, match=r"shard-000000.tar: member 'set/a.txt' is not one of"):
        list(iter_shard(path))
