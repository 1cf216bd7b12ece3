"""Safety: loading a file never runs code from it, exports are safetensors, and nothing reaches the
network unless the user passes a URL with --allow-remote.

The network guard refuses every connection and name lookup that would leave the machine (loopback
stays open: it never leaves the host) and logs the attempt. It is installed in this process with
`block_network`, and in `leader` subprocesses by a sitecustomize.py on their PYTHONPATH.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.faults.conftest import REPO, assert_one_line_error, invoke, train_args
from tests.network_guard import block_network, guarded_env


@pytest.fixture()
def network_log(tmp_path):
    """The guard in this process for the test's duration; the log of refused attempts."""
    log = tmp_path / "network.log"
    log.touch()
    undo = block_network(str(log))
    yield log
    undo()


# ---------------------------------------------------------------------------------------------
# The guard itself: proof that it would catch a call home


def test_the_network_guard_blocks_this_process_and_subprocesses(network_log, tmp_path):
    import urllib.request

    with pytest.raises(OSError, match="network access blocked"):
        urllib.request.urlopen("http://example.com", timeout=5)
    assert "getaddrinfo 'example.com'" in network_log.read_text()

    subprocess_log = tmp_path / "subprocess.log"
    subprocess_log.touch()
    probe = "import socket; socket.socket().connect(('192.0.2.1', 443))"
    result = subprocess.run([sys.executable, "-c", probe], env=guarded_env(tmp_path, subprocess_log),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "network access blocked" in result.stderr
    assert subprocess_log.read_text() == "connect ('192.0.2.1', 443)\n"


# ---------------------------------------------------------------------------------------------
# Nothing phones home


# The demo's smoke path runs under this guard in tests/test_demo.py (its one smoke run serves both).


@pytest.mark.parametrize("kind, options, words", [
    ("cxr-foundation", [], ["is not a local path", "pass --allow-remote"]),
    ("timm", ["--option", "arch=test_resnet"], ["is not a local path", "loads local checkpoints only"]),
    ("adam", [], ["is not a local path"]),
])
def test_a_model_url_is_refused_without_allow_remote(fault_inputs, network_log, tmp_path, kind, options, words):
    url = "https://tfhub.dev/google/cxr-foundation/1"
    result = invoke("precompute", "--teacher", "disease", "--kind", kind, "--model", url, *options,
                    "--shards", fault_inputs["shards"], "--cache", tmp_path / "cache.zarr")
    assert_one_line_error(result, url, *words)
    assert network_log.read_text() == ""
    assert not (tmp_path / "cache.zarr").exists()


def test_cxr_foundation_refuses_a_url_before_loading_tensorflow(network_log):
    from leader.errors import LeaderError
    from leader.precompute.teachers import create_teacher

    had_tensorflow = "tensorflow" in sys.modules
    with pytest.raises(LeaderError, match="pass --allow-remote"):
        create_teacher("cxr-foundation", model="gs://cxr-foundation/v2", allow_remote=False)
    assert ("tensorflow" in sys.modules) == had_tensorflow
    assert network_log.read_text() == ""


# ---------------------------------------------------------------------------------------------
# Loading never runs code


def torch_load_calls(root: Path):
    """(file, line, call) for every call of torch.load in the package's source."""
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                yield path.relative_to(REPO), node.lineno, node


def test_every_torch_load_in_the_package_passes_weights_only_true():
    calls = list(torch_load_calls(REPO / "leader"))
    assert calls, "the scan found no torch.load at all: it is looking in the wrong place"
    unsafe = [f"{path}:{line}" for path, line, call in calls
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in call.keywords)]
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"


def test_the_package_uses_no_other_unpickling_loader():
    risky = ("pickle.load", "pickle.loads", "pickle.Unpickler", "allow_pickle=True", "joblib.load", "dill.load",
             "cloudpickle.load", "torch.jit.load")
    found = [f"{path.relative_to(REPO)}: {word}" for path in sorted((REPO / "leader").rglob("*.py"))
             for word in risky if word in path.read_text(encoding="utf-8")]
    assert found == []


class CodeOnLoad:
    """An object whose unpickling would create a directory: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def pickle_bomb(path: Path, marker: Path, state: dict | None = None) -> Path:
    torch.save({**(state or {"conv1.weight": torch.zeros(8, 3, 7, 7)}), "payload": CodeOnLoad(marker)}, path)
    return path


@pytest.mark.parametrize("kind, options", [("adam", []), ("timm", ["--option", "arch=test_resnet"])])
def test_teachers_refuse_a_checkpoint_that_would_run_code(fault_inputs, tmp_path, kind, options):
    marker = tmp_path / "code-ran"
    bomb = pickle_bomb(tmp_path / "teacher.pth", marker)
    result = invoke("precompute", "--teacher", "anatomy", "--kind", kind, "--model", bomb, *options,
                    "--shards", fault_inputs["shards"], "--cache", tmp_path / "cache.zarr")
    assert_one_line_error(result, str(bomb), "holds Python objects besides tensors", "weights_only=True")
    assert not marker.exists()


def test_resume_and_export_refuse_a_checkpoint_that_would_run_code(fault_inputs, reference_run, tmp_path):
    run = shutil.copytree(reference_run, tmp_path / "run")
    marker = tmp_path / "code-ran"
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    pickle_bomb(run / "checkpoint.pt", marker, saved)
    # Whoever can replace the checkpoint can replace its sha256 sidecar too: weights_only must hold alone.
    from leader.io import sha256_file

    (run / "checkpoint.pt.sha256").write_text(f"{sha256_file(run / 'checkpoint.pt')}  checkpoint.pt\n")
    resumed = invoke(*train_args(fault_inputs["shards"], fault_inputs["cache"], run, resume=True))
    assert_one_line_error(resumed, str(run / "checkpoint.pt"), "weights_only=True")
    exported = invoke("export", run, "--out", tmp_path / "export")
    assert_one_line_error(exported, str(run / "checkpoint.pt"), "weights_only=True")
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


def test_export_writes_safetensors_and_json_only(reference_run, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "export"
    assert invoke("export", reference_run, "--out", out).code == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["SHA256SUMS", "config.json", "heads.json", "heads.safetensors", "model.safetensors"]
    for name in ("model.safetensors", "heads.safetensors"):
        with safe_open(str(out / name), framework="pt") as f:      # parses only the header and raw tensors
            assert len(list(f.keys())) > 0
        assert (out / name).read_bytes()[:2] not in (b"PK", b"\x80\x02"), "a torch.save zip or pickle"
