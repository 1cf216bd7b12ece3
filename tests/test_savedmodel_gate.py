"""The SavedModel gate: a CXR Foundation model is read as a protobuf, op by op, before it is loaded;
one that can touch files or run Python is refused by name unless the user trusts it.

Every model here is written in the real CXR Foundation v2 layout (`serving_default(input_example)`
-> `feature_maps_0`) by the project's exporter; the bad ones differ only by what their backbone
adds to the serving function.
"""
from __future__ import annotations

import torch  # before tensorflow, always
import timm  # noqa: F401  (and torch's family: timm pulls torchvision, which crashes once TF is loaded)
import numpy as np
import pytest

from leader.cli import main as leader_main
from leader.errors import LeaderError
from leader.precompute.teachers import create_teacher
from leader.precompute.teachers.savedmodel_gate import CATEGORIES, audit_savedmodel, check_savedmodel
from tests.teacher_fixtures import make_cxr_foundation_savedmodel


def reads_a_file(path):
    """A backbone wrapper whose serving function reads `path` (tf.io.read_file: a ReadFile op)."""
    import tensorflow as tf

    class ReadsAFile(tf.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, images):
            size = tf.cast(tf.strings.length(tf.io.read_file(str(path))), tf.float32)
            return self.inner(images) + 0.0 * size

    return ReadsAFile


def calls_python(backbone):
    """A backbone wrapper whose serving function calls back into Python (tf.py_function: EagerPyFunc)."""
    import tensorflow as tf

    class CallsPython(tf.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, images):
            images = tf.py_function(lambda x: x, [images], tf.float32)
            images.set_shape([None, None, None, 1])
            return self.inner(images)

    return CallsPython(backbone)


def reads_a_file_in_a_loop(path):
    """ReadFile in the body of a tf.map_fn: a function nested in the serving function."""
    import tensorflow as tf

    class ReadsInALoop(tf.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, images):
            def touch(image):
                return image + 0.0 * tf.cast(tf.strings.length(tf.io.read_file(str(path))), tf.float32)

            return self.inner(tf.map_fn(touch, images))

    return ReadsInALoop


def restores_a_checkpoint(prefix):
    """RestoreV2 called from the serving function (checkpoint reading outside the saver), from a
    checkpoint written here so that the exporter's trial call succeeds."""
    import tensorflow as tf

    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=["x"], shape_and_slices=[""], tensors=[tf.constant([1.0])])

    class Restores(tf.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, images):
            restored = tf.raw_ops.RestoreV2(prefix=str(prefix), tensor_names=["x"], shape_and_slices=[""],
                                            dtypes=[tf.float32])[0]
            return self.inner(images) + 0.0 * tf.reduce_sum(restored)

    return Restores


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    path = tmp_path_factory.mktemp("home") / "secret.txt"
    path.write_text("a file the teacher has no business reading")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, secret):
    root = tmp_path_factory.mktemp("savedmodels")
    return {
        "clean": make_cxr_foundation_savedmodel(root / "clean"),
        "read_file": make_cxr_foundation_savedmodel(root / "read_file", wrap=reads_a_file(secret)),
        "py_function": make_cxr_foundation_savedmodel(root / "py_function", wrap=calls_python),
        "nested": make_cxr_foundation_savedmodel(root / "nested", wrap=reads_a_file_in_a_loop(secret)),
        "restore": make_cxr_foundation_savedmodel(root / "restore", wrap=restores_a_checkpoint(root / "ckpt")),
    }


def test_a_savedmodel_in_the_real_layout_passes_and_loads(models):
    # Its saver's traced save/restore functions hold SaveV2/RestoreV2/MergeV2Checkpoints: allowed there.
    assert audit_savedmodel(models["clean"]) == []
    teacher = create_teacher("cxr-foundation", model=models["clean"])
    assert teacher.dim == 16
    assert teacher.embed(torch.rand(2, 1, 32, 32), bits=8).shape == (2, 16)


def test_a_read_file_in_the_serving_function_is_refused_naming_the_op_and_its_function(models):
    [finding] = audit_savedmodel(models["read_file"])
    assert (finding.op, finding.category) == ("ReadFile", "file system")
    assert finding.where.startswith("function __inference_serve_")
    assert "signature 'serving_default'" in finding.reached_from

    with pytest.raises(LeaderError) as refused:
        create_teacher("cxr-foundation", model=models["read_file"])
    message = str(refused.value)
    assert "\n" not in message
    assert "was not loaded" in message and "ReadFile [file system] in function __inference_serve_" in message
    assert message.endswith("with --trust-model")


def test_a_py_function_in_the_serving_function_is_refused(models):
    with pytest.raises(LeaderError, match=r"Python ops: EagerPyFunc \[Python\] in function __inference_serve_"):
        create_teacher("cxr-foundation", model=models["py_function"])


def test_an_op_in_a_nested_loop_body_is_found(models):
    [finding] = audit_savedmodel(models["nested"])
    assert finding.op == "ReadFile"
    assert "while_body" in finding.where          # the map_fn body, a function of its own
    assert "signature 'serving_default'" in finding.reached_from


def test_checkpoint_ops_are_allowed_in_the_saver_only(models):
    [finding] = audit_savedmodel(models["restore"])
    assert (finding.op, finding.category) == ("RestoreV2", "checkpoint outside the saver")
    assert finding.where.startswith("function __inference_serve_")


def test_trust_model_loads_a_refused_model_and_it_then_runs_its_ops(models, secret, caplog):
    teacher = create_teacher("cxr-foundation", model=models["read_file"], trust_model=True)
    assert "with --trust-model although it holds: ReadFile" in caplog.text
    assert teacher.embed(torch.rand(1, 1, 32, 32), bits=8).shape == (1, 16)   # it read the file

    assert create_teacher("cxr-foundation", model=models["py_function"], trust_model=True).dim == 16
    assert check_savedmodel(models["nested"], trust_model=True)[0].op == "ReadFile"


def test_the_command_line_refuses_in_one_line_and_trust_model_lets_it_run(models, phantom_shards, tmp_path, capsys):
    cache = tmp_path / "cache.zarr"
    args = ["precompute", "--teacher", "disease", "--shards", str(phantom_shards), "--cache", str(cache),
            "--model", str(models["read_file"]), "--views", "1", "--decode-threads", "0"]
    with pytest.raises(SystemExit) as exit_code:
        leader_main(args)
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: teacher 'cxr-foundation': SavedModel") and "ReadFile [file system]" in err
    assert not cache.exists()                    # refused before anything was written

    with pytest.raises(SystemExit) as exit_code:
        leader_main([*args, "--trust-model"])
    assert exit_code.value.code in (0, None)
    assert "teacher 'disease' is complete" in capsys.readouterr().out


def test_trust_model_is_refused_for_a_teacher_that_is_not_a_savedmodel(tmp_path):
    with pytest.raises(LeaderError, match="--trust-model applies to TensorFlow SavedModels .* teacher 'adam'"):
        create_teacher("adam", model=tmp_path / "x.pth", trust_model=True)


def test_a_directory_without_a_savedmodel_protobuf_is_named(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"\xff\xff not a protobuf")
    with pytest.raises(LeaderError, match="saved_model.pb does not parse"):
        audit_savedmodel(tmp_path)
    with pytest.raises(LeaderError, match="has no saved_model.pb"):
        audit_savedmodel(tmp_path / "missing")


def test_every_denied_op_is_a_tensorflow_op():
    """The list names real ops (a misspelt name would guard nothing)."""
    from tensorflow.python.framework import op_def_registry

    denied = set().union(*CATEGORIES.values())
    assert len(denied) > 80
    assert sorted(op for op in denied if op_def_registry.get(op) is None) == []
    assert not np.isin(["Conv2D", "DecodePng", "ParseExampleV2", "StatefulPartitionedCall"], sorted(denied)).any()
