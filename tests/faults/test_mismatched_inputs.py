"""Mismatched inputs: each stage refuses inputs that do not belong together, in one line that
names the mismatch, before it computes or overwrites anything."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.faults.conftest import (
    assert_one_line_error, build_args, invoke, precompute_args, save_timm_checkpoint, torch_threads, train_args)


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory):
    """A different shard set: other phantom patients (seed), fewer images."""
    out = tmp_path_factory.mktemp("other") / "shards"
    assert invoke(*build_args(out, n=8, seed=5)).code == 0
    return out


@pytest.fixture()
def cache_copy(fault_inputs, tmp_path):
    """A private copy of the complete reference cache, to damage."""
    return shutil.copytree(fault_inputs["cache"], tmp_path / "cache.zarr")


@pytest.fixture()
def run_copy(reference_run, tmp_path):
    """A private copy of the finished reference run, to resume."""
    return shutil.copytree(reference_run, tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# A cache from other shards


def test_train_refuses_a_cache_made_for_other_shards(fault_inputs, other_shards, tmp_path):
    result = invoke(*train_args(other_shards, fault_inputs["cache"], tmp_path / "run"))
    assert_one_line_error(result, f"teacher cache {fault_inputs['cache']} does not match the shards at {other_shards}",
                          "the cache has 16 shards, the manifest 4")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_precompute_refuses_to_add_to_a_cache_made_for_other_shards(fault_inputs, other_shards, cache_copy):
    result = invoke(*precompute_args("disease", other_shards, cache_copy, fault_inputs["models"]["disease"]))
    assert_one_line_error(result, f"cache {cache_copy} was made for other shards", "use a new --cache")


def test_precompute_refuses_other_view_settings_for_an_existing_cache(fault_inputs, cache_copy):
    shards, model = fault_inputs["shards"], fault_inputs["models"]["disease"]
    assert_one_line_error(invoke(*precompute_args("disease", shards, cache_copy, model), "--seed", "7"),
                          "was made with another seed (0; asked now: 7)")
    assert_one_line_error(invoke(*precompute_args("disease", shards, cache_copy, model, views=3)),
                          "holds 2 views per item; 3 were asked for")


# ---------------------------------------------------------------------------------------------
# A cache missing a teacher or a shard


def test_train_refuses_a_cache_without_a_teacher_it_needs(fault_inputs, tmp_path):
    from leader.precompute.run import CacheLayout, Execution, precompute
    from leader.precompute.teachers import create_teacher

    disease_only = tmp_path / "disease-only.zarr"
    with torch_threads(1), create_teacher("timm", model=fault_inputs["models"]["disease"], arch="test_resnet",
                                          input_size=32) as teacher:
        precompute(fault_inputs["shards"], "disease", teacher, disease_only, CacheLayout(views=2, patch_size=32),
                   Execution(batch_size=64))
    result = invoke(*train_args(fault_inputs["shards"], disease_only, tmp_path / "run"))
    assert_one_line_error(result, "no cache holds teacher 'anatomy'", f"{disease_only}: disease")


def test_train_refuses_a_cache_with_a_shard_not_done(fault_inputs, cache_copy, tmp_path):
    from leader.precompute.cache import TeacherCache

    TeacherCache.open(cache_copy, mode="r+").reset_done("anatomy", 5)
    result = invoke(*train_args(fault_inputs["shards"], cache_copy, tmp_path / "run"))
    assert_one_line_error(result, f"teacher 'anatomy' in cache {cache_copy} is unfinished", "shard-000005.tar",
                          "finish `leader precompute` first")


def test_every_stage_refuses_a_shard_set_with_a_shard_file_missing(fault_inputs, tmp_path):
    shards = shutil.copytree(fault_inputs["shards"], tmp_path / "shards")
    (shards / "shard-000007.tar").unlink()
    expected = ["1 of the 16 shards its manifest.json lists are missing, first shard-000007.tar",
                "rebuild it with `leader shards build ... --overwrite`"]
    assert_one_line_error(invoke(*train_args(shards, fault_inputs["cache"], tmp_path / "run")), *expected)
    assert_one_line_error(invoke(*precompute_args("disease", shards, tmp_path / "c.zarr",
                                                  fault_inputs["models"]["disease"])), *expected)
    assert_one_line_error(invoke("shards", "info", shards), *expected)


def test_train_names_a_damaged_shard_instead_of_crashing(fault_inputs, tmp_path):
    """A shard cut short after the manifest was written (a failed copy, a bad disk)."""
    shards = shutil.copytree(fault_inputs["shards"], tmp_path / "shards")
    tar = shards / "shard-000002.tar"                           # holds train images: phase 1 reads it
    tar.write_bytes(tar.read_bytes()[:5000])
    result = invoke(*train_args(shards, fault_inputs["cache"], tmp_path / "run"))
    assert_one_line_error(result, f"shard {tar}", "unreadable")


# ---------------------------------------------------------------------------------------------
# A teacher that changed under a run or a cache


def test_resume_refuses_a_cache_whose_teacher_dimension_differs_from_the_heads(fault_inputs, cache_copy, run_copy):
    from leader.precompute.cache import TeacherCache
    from leader.precompute.run import CacheLayout, Execution, precompute
    from leader.precompute.teachers import create_teacher

    # "disease" recomputed by another architecture: 64-d ConvNeXt features instead of 96-d ResNet ones.
    with torch_threads(1), create_teacher("timm", model=fault_inputs["models"]["anatomy"], arch="test_convnext",
                                          input_size=32) as teacher:
        precompute(fault_inputs["shards"], "disease", teacher, cache_copy, CacheLayout(views=2, patch_size=32),
                   Execution(batch_size=64), overwrite_teacher=True)
    assert TeacherCache.open(cache_copy).emb_shape("disease")[2] == 64
    before = (run_copy / "checkpoint.pt").read_bytes()
    result = invoke(*train_args(fault_inputs["shards"], cache_copy, run_copy, resume=True))
    assert_one_line_error(result, "--resume: the caches' teacher dimensions", "'disease': 64",
                          "differ from the run's heads", "'disease': 96")
    assert (run_copy / "checkpoint.pt").read_bytes() == before


def test_resumed_precompute_refuses_weights_with_another_fingerprint(fault_inputs, cache_copy, tmp_path):
    from leader.precompute.cache import TeacherCache

    cache = TeacherCache.open(cache_copy, mode="r+")
    for shard in (3, 9):                                        # a run that stopped part-way
        cache.reset_done("disease", shard)
    before = cache.read_block("disease", 0, cache.n_items)
    retrained = save_timm_checkpoint(tmp_path / "retrained.pt", "test_resnet", seed=2)
    result = invoke(*precompute_args("disease", fault_inputs["shards"], cache_copy, retrained))
    assert_one_line_error(result, f"teacher 'disease' in cache {cache_copy} was computed with weights sha256",
                          "the model given now has", "use a new --cache or --overwrite-teacher")
    cache = TeacherCache.open(cache_copy)
    assert int(cache.is_done("disease").sum()) == 14
    np.testing.assert_array_equal(cache.read_block("disease", 0, cache.n_items), before)


def test_resume_refuses_a_config_change_that_alters_the_model(fault_inputs, run_copy):
    before = (run_copy / "checkpoint.pt").read_bytes()
    result = invoke(*train_args(fault_inputs["shards"], fault_inputs["cache"], run_copy, "model.head_hidden=64",
                                resume=True))
    assert_one_line_error(result, "--resume refused: config key model.head_hidden changed (128 -> 64)",
                          "it alters the model", "start a new --out")
    assert (run_copy / "checkpoint.pt").read_bytes() == before
