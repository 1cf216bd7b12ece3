"""Reading PyTorch checkpoints safely and fitting their keys onto timm backbones.

Published checkpoints wrap the backbone in training machinery: DDP's `module.` prefix, MoCo's
`encoder_q`/`encoder_k` pair, DINO's student/teacher pair with projection heads, and the original
ConvNeXt repository's own key names. These helpers peel that away so that what remains is a timm
state dict, and loading it is strict: a backbone key that is missing is an error, never a silently
random layer.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from leader.errors import LeaderError

StateDict = dict[str, torch.Tensor]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def read_checkpoint(path: Path) -> object:
    """torch.load with weights_only=True (no code runs), or safetensors for .safetensors files.

    A checkpoint with a sha256 sidecar, or listed by a SHA256SUMS beside it (a leader export), is
    checked against it first."""
    from leader.checksums import verify_listed

    verify_listed(path, "checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle with code in it, a wrong format
        raise LeaderError(f"cannot read checkpoint {str(path)!r}: {load_error_reason(exc)}") from exc


def load_error_reason(exc: Exception) -> str:
    """One line on why torch.load failed. torch's own message for a refused object spans several
    paragraphs and suggests weights_only=False, the one thing never to do with an untrusted file."""
    text = str(exc)
    if "Weights only load failed" in text:
        detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
        found = f" ({detail.rstrip('.')})" if detail else ""
        return (f"it holds Python objects besides tensors{found}; checkpoints are loaded with "
                "torch.load(weights_only=True), so nothing in them can run code. Save the weights as a plain "
                "state dict or as .safetensors")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def unwrap_state_dict(obj: object, source: str) -> StateDict:
    """The tensor dict inside a checkpoint: the object itself, or its 'state_dict'/'model' entry."""
    if is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if is_state_dict(obj.get(key)):
                return dict(obj[key])
        found = ", ".join(sorted(map(str, obj))[:12])
        raise LeaderError(f"checkpoint {source} holds no state dict (looked at the top level and {', '.join(_WRAPPER_KEYS)}); top-level keys: {found}")
    raise LeaderError(f"checkpoint {source} holds a {type(obj).__name__}, not a state dict")


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """Drop `prefix` where every key carries it (DDP's `module.`); leave the dict alone otherwise."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def select_prefix(state: StateDict, prefix: str) -> StateDict:
    """The sub-dict under `prefix` (e.g. MoCo's `encoder_q.`), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def is_facebook_convnext(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("downsample_layers.") for k in state)


def convnext_facebook_to_timm(state: StateDict) -> StateDict:
    """Rename keys of the official ConvNeXt (facebookresearch/ConvNeXt) to timm's ConvNeXt.

    The official model keeps the stem as downsample_layers.0 (conv, norm) and the stage
    transitions as downsample_layers.N (norm, conv); timm moves each transition into its stage.
    Inside a block, dwconv/pwconv1/pwconv2 become conv_dw/mlp.fc1/mlp.fc2. The final `norm` is the
    LayerNorm after global pooling, which timm calls head.norm; the official classifier `head` is
    timm's head.fc. ConvNeXt-V2's GRN parameters are stored (1, 1, 1, C) there and (C,) in timm.
    """
    renamed: StateDict = {}
    for key, value in state.items():
        new = key
        if new.startswith("downsample_layers.0."):
            new = "stem." + new[len("downsample_layers.0."):]
        new = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", new)
        new = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", new)
        new = new.replace(".dwconv.", ".conv_dw.")
        new = new.replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
        if ".grn." in new:
            new = new.replace(".grn.gamma", ".mlp.grn.weight").replace(".grn.beta", ".mlp.grn.bias")
            value = value.reshape(-1)
        if new.startswith("norm."):
            new = "head." + new
        elif new.startswith("head.") and not new.startswith("head.norm."):
            new = "head.fc." + new[len("head."):]
        renamed[new] = value
    return renamed


def classifier_prefix(model: torch.nn.Module) -> str | None:
    """The name of the model's classifier (timm's pretrained_cfg 'classifier', e.g. 'fc', 'head.fc')."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier")
    return name if isinstance(name, str) else None


def load_backbone(model: torch.nn.Module, state: StateDict, source: str,
                  extra_droppable: tuple[str, ...] = ()) -> list[str]:
    """Load `state` into a timm backbone built with num_classes=0; returns the keys dropped.

    Dropped, by design: the classifier (the model pools to features, so any fc/head.fc weights of a
    training head are not used) and `extra_droppable` prefixes the caller names (e.g. MoCo's MLP).
    Missing BatchNorm `num_batches_tracked` counters are tolerated: they only matter in training.
    Anything else missing or unexpected, or a shape that does not fit, is a LeaderError.
    """
    expected = model.state_dict()
    droppable = tuple(p.rstrip(".") + "." for p in extra_droppable)
    head = classifier_prefix(model)
    if head:
        droppable += (head + ".",)
    dropped = sorted(k for k in state if k not in expected and k.startswith(droppable))
    kept = {k: _fit_linear_to_conv(v, expected.get(k)) for k, v in state.items() if k not in dropped}

    missing = sorted(k for k in expected if k not in kept and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in kept if k not in expected)
    wrong_shape = sorted(f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
                         for k, v in kept.items() if k in expected and v.shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing backbone keys ({_preview(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} keys of the wrong shape ({_preview(wrong_shape)})")
    if problems:
        raise LeaderError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(problems)
                          + " - is the architecture right? (option arch=)")
    model.load_state_dict(kept, strict=False)
    return dropped


def _fit_linear_to_conv(value: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """A Linear weight (O, I) where the model has the same map as a 1x1 conv (O, I, 1, 1).

    Some timm variants (e.g. ConvNeXt with conv_mlp) compute a channel MLP as 1x1 convolutions;
    the numbers are the same, only the shape differs.
    """
    if target is not None and value.ndim == 2 and target.ndim == 4 and tuple(target.shape[2:]) == (1, 1) \
            and tuple(target.shape[:2]) == tuple(value.shape):
        return value.reshape(target.shape)
    return value


def _preview(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... {len(keys) - n} more" if len(keys) > n else "")
