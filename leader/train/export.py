"""`leader export RUN --out DIR`: the student as files any timm user can load.

    DIR/model.safetensors   the backbone's weights, timm names
    DIR/config.json         timm's hub config: architecture, num_classes 0, model_args, pretrained_cfg
    DIR/heads.safetensors   the heads ("<teacher>.<layer>...") and target normalisation statistics
    DIR/heads.json          teacher -> dimension, hidden width, target normalisation
    DIR/SHA256SUMS          the four files' sha256 (`sha256sum -c SHA256SUMS`); leader checks it
                            wherever it reads them (load_heads, a timm teacher or fine-tuning source)

Loading the backbone needs nothing of leader:

    model = timm.create_model("local-dir:DIR", pretrained=True)
    # or, naming the file:
    cfg = json.load(open("DIR/config.json"))
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0, **cfg["model_args"],
                              pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

import leader
from leader.checksums import SUMS_NAME, verify_listed, write_sums
from leader.io import atomic_write_bytes, atomic_write_json
from leader.train.checkpoint import Checkpoint
from leader.train.config import config_from_dict


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_run(run: str | Path, out: str | Path) -> list[Path]:
    checkpoint = Checkpoint.load(run)
    cfg = config_from_dict(checkpoint.config)
    out = Path(out)
    model_state = checkpoint.inference_weights()
    backbone = {k[len("backbone."):]: v for k, v in model_state.items() if k.startswith("backbone.")}
    heads = {k[len("heads."):]: v for k, v in model_state.items() if k.startswith("heads.")}
    heads.update({f"target_norm.{k}": v for k, v in checkpoint.target_norm.items()})

    model_args = {"in_chans": cfg.model.in_chans, **cfg.model.kwargs}
    size = cfg.model.image_size
    mean, std = list(cfg.model.mean), list(cfg.model.std)
    if cfg.model.in_chans == 1:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    timm_config = {
        "architecture": cfg.model.name,
        "num_classes": 0,
        "num_features": int(backbone_width(model_state)),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [cfg.model.in_chans, size, size], "mean": mean, "std": std,
            "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": 0,
            "notes": "LeADER student: grayscale CXR in [0, 1], replicated to RGB" if cfg.model.in_chans == 3
            else "LeADER student: one-channel grayscale CXR in [0, 1]",
        },
        "leader": {"version": leader.__version__, "step": checkpoint.state.global_step,
                   "target_norm": cfg.target_norm, "patch_size": checkpoint.patch_size},
    }
    files = [out / "model.safetensors", out / "config.json", out / "heads.safetensors", out / "heads.json"]
    # The sums go first and come back last: an interrupted re-export leaves none that could vouch
    # for a mix of old and new files.
    (out / SUMS_NAME).unlink(missing_ok=True)
    atomic_write_bytes(files[0], safetensors_bytes(_contiguous(backbone), metadata={"format": "pt"}))
    atomic_write_json(files[1], timm_config)
    atomic_write_bytes(files[2], safetensors_bytes(_contiguous(heads), metadata={"format": "pt"}))
    atomic_write_json(files[3], {"teachers": checkpoint.head_dims, "hidden": cfg.model.head_hidden,
                                 "in_features": timm_config["num_features"], "target_norm": cfg.target_norm,
                                 "head": cfg.model.head, "layout": HEAD_LAYOUTS[cfg.model.head]})
    return files + [write_sums(out, [f.name for f in files])]


HEAD_LAYOUTS = {
    "mlp": "<teacher>.0 = Linear(in, hidden), GELU, <teacher>.2 = Linear(hidden, dim)",
    "dino": "<teacher>.mlp.* = Linear layers (GELU between) from in to the bottleneck; L2-normalise; "
            "out = L2-normalise(x @ L2-normalise-rows(<teacher>.directions).T), directions (dim, bottleneck)",
}


def backbone_width(model_state: dict[str, torch.Tensor]) -> int:
    """The pooled feature width: the input width of any head's first layer."""
    first = next(v for k, v in model_state.items()
                 if k.startswith("heads.") and (k.endswith(".0.weight") or k.endswith(".mlp.0.weight")))
    return first.shape[1]


def load_heads(export_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(heads.json, tensors) of an export, for users who want E'_D / E'_A without leader's trainer."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    for name in ("heads.json", "heads.safetensors"):
        verify_listed(export_dir / name, "export file")
    return json.loads((export_dir / "heads.json").read_text()), load_file(export_dir / "heads.safetensors")
