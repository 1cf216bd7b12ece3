"""`timm`: any timm backbone with a local checkpoint, pooled to one embedding per view.

    create_teacher("timm", model="densenet.safetensors", arch="densenet121")

The network is built with num_classes=0, so its output is timm's pooled pre-logits feature (global
average pool for CNNs; for ConvNeXt the pool is followed by the head LayerNorm). Views arrive
grayscale in [0, 1]; they are resized to `input_size` when rendered at another size, replicated to
three channels and normalised with ImageNet mean/std, which is how ImageNet-initialised CXR models
such as Adam were trained. `AdamTeacher` reuses all of this with its own checkpoint unwrapping.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from leader.errors import LeaderError
from leader.io import sha256_file
from leader.network_input import IMAGENET_MEAN, IMAGENET_STD, normalise_input
from leader.precompute.teachers import register_teacher
from leader.precompute.teachers.base import Teacher, local_model_path
from leader.precompute.teachers.checkpoints import (
    StateDict, load_backbone, read_checkpoint, strip_prefix, unwrap_state_dict)



@register_teacher("timm")
class TimmTeacher(Teacher):
    kind = "timm"

    def __init__(self, model: str | Path | None, device: str = "cpu", allow_remote: bool = False,
                 arch: str | None = None, input_size: int = 224):
        # allow_remote is accepted for a uniform factory call, but a checkpoint is always read from
        # disk: torch.load of a downloaded file is where unsafe code would come from.
        self.path = local_model_path(model, self.kind, want="file", remote_possible=False)
        self.input_size = int(input_size)
        if self.input_size <= 0:
            raise LeaderError(f"teacher {self.kind!r}: input_size must be positive, got {input_size}")
        source = repr(str(self.path))
        state, layout, droppable = self.backbone_state(read_checkpoint(self.path), source)
        self.arch = self.choose_arch(arch, state, source)
        try:
            net = timm.create_model(self.arch, pretrained=False, num_classes=0)
        except RuntimeError as exc:  # timm's "Unknown model (...)"
            raise LeaderError(f"teacher {self.kind!r}: timm has no model {self.arch!r} (option arch)") from exc
        self.dropped_keys = load_backbone(net, state, source, extra_droppable=droppable)
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.dim = self._probe_dim()
        self.fingerprint = sha256_file(self.path)
        self.preprocessing = {
            "arch": self.arch, "checkpoint_layout": layout, "input_size": self.input_size,
            "resize": "bilinear, antialias, when the view is rendered at another size",
            "channels": "grayscale replicated to 3", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "pooling": "timm num_classes=0 (global average pool; ConvNeXt: pool, then LayerNorm)",
        }

    def backbone_state(self, checkpoint: object, source: str) -> tuple[StateDict, str, tuple[str, ...]]:
        """(timm state dict, a name for the layout, extra key prefixes that may be dropped)."""
        return strip_prefix(unwrap_state_dict(checkpoint, source), "module."), "state_dict", ()

    def choose_arch(self, arch: str | None, state: StateDict, source: str) -> str:
        if not arch:
            raise LeaderError(f"teacher {self.kind!r} needs the timm architecture of {source} (option arch, e.g. resnet50)")
        return arch

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, 3, input_size, input_size), ImageNet-normalised."""
        x = pixels.to(self.device, torch.float32, non_blocking=True)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return normalise_input(x, 3)

    def _embed(self, pixels: torch.Tensor, bits: int) -> np.ndarray:
        with torch.inference_mode():
            features = self.net(self.preprocess(pixels))
        return features.float().cpu().numpy()

    def _probe_dim(self) -> int:
        # The pooled width is what the network really returns; num_features is not always it
        # (some timm heads add a hidden layer), so run one blank view.
        with torch.inference_mode():
            out = self.net(self.preprocess(torch.zeros(1, 1, self.input_size, self.input_size)))
        if out.ndim != 2:
            raise LeaderError(f"teacher {self.kind!r}: {self.arch} returns shape {tuple(out.shape)}, not pooled features")
        return int(out.shape[1])

    def close(self) -> None:
        self.net = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
