"""One training step on the device: replay the cached views, run the student, take the loss.

The loader hands over uint8/uint16 pixels at the stored size plus view parameters; everything that
touches pixels at full resolution happens here, batched, on the GPU when there is one. The views
are rendered by `replay_views`, the very function that rendered them for the teachers, so the
student sees the picture its targets were computed on.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from leader.network_input import normalise_input
from leader.shards.crop import crop_patch
from leader.train.config import LossConfig, ModelConfig
from leader.train.model import TargetNorm
from leader.views import replay_views


def size_groups(hw: torch.Tensor | np.ndarray, side: int) -> list[tuple[int, int, np.ndarray]]:
    """(h, w, batch rows) for each image size in a batch of (B, 1, side, side) canvases."""
    hw = hw.cpu().numpy() if isinstance(hw, torch.Tensor) else np.asarray(hw)
    if (hw == side).all():
        return [(side, side, np.arange(len(hw)))]
    sizes, inverse = np.unique(hw, axis=0, return_inverse=True)
    return [(int(h), int(w), np.flatnonzero(inverse.reshape(-1) == i)) for i, (h, w) in enumerate(sizes)]


def _per_size(images: torch.Tensor, hw, out_size: int, render) -> torch.Tensor:
    """Apply render(images (n, 1, h, w), rows) to each size group of top-left-placed canvases.

    Views and patches are defined on the image itself, black beyond its edges (views.py), so each
    image is rendered from its own extent, exactly as the teachers saw it, not from the zero-padded
    canvas. Batches of square images (the usual case) take one call.
    """
    side = images.shape[-1]
    groups = size_groups(hw, side)
    if len(groups) == 1 and groups[0][:2] == (side, side):
        return render(images, groups[0][2])
    out = torch.empty(images.shape[0], 1, out_size, out_size, device=images.device)
    for h, w, rows in groups:
        index = torch.from_numpy(rows).to(images.device)
        out[index] = render(images[index, :, :h, :w], rows)
    return out


def render_images(images: torch.Tensor, hw, params, out_size: int) -> torch.Tensor:
    """Views of whole images at the student's resolution: (B, 1, out, out) float in [0, 1].

    images: (B, 1, S, S) uint8/uint16 canvases holding each (h, w) image at the top-left (loader.py).
    """
    params = params.cpu().numpy() if isinstance(params, torch.Tensor) else np.asarray(params)
    return _per_size(images, hw, out_size, lambda x, rows: replay_views(x, params[rows], out_size))


def render_patches(images: torch.Tensor, hw, boxes, params, patch_size: int, out_size: int) -> torch.Tensor:
    """Views of patches: cut at the cache's patch_size first, exactly as for the teachers."""
    boxes = boxes.cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    params = params.cpu().numpy() if isinstance(params, torch.Tensor) else np.asarray(params)
    return _per_size(images, hw, out_size,
                     lambda x, rows: replay_views(crop_patch(x, boxes[rows], patch_size), params[rows], out_size))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the rows whose target exists (an import teacher may lack some)."""
    target, valid = _fill_invalid(target, valid, pred.device)
    per_row = (pred - target).square().mean(dim=-1)
    return (per_row * valid).sum() / valid.sum().clamp_min(1)


def masked_cross_entropy(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                         student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """H(softmax(target / teacher_t), softmax(pred / student_t)) over the embedding dimensions, mean
    over the rows whose target exists: the paper's cross-entropy ablation, the distillation loss of
    DINO (a sharper teacher distribution than the student's)."""
    target, valid = _fill_invalid(target, valid, pred.device)
    teacher = torch.softmax(target / teacher_temperature, dim=-1)
    per_row = -(teacher * torch.log_softmax(pred / student_temperature, dim=-1)).sum(dim=-1)
    return (per_row * valid).sum() / valid.sum().clamp_min(1)


def _fill_invalid(target: torch.Tensor, valid: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Invalid rows hold NaN in the cache; they are zeroed before any arithmetic, because NaN * 0 is
    # still NaN.
    valid = valid.to(device)
    return torch.where(valid[:, None], target, torch.zeros((), dtype=target.dtype, device=target.device)), valid


@dataclass
class StudentInput:
    image_size: int
    patch_size: int
    in_chans: int
    mean: tuple
    std: tuple
    channels_last: bool = False

    @classmethod
    def from_config(cls, cfg: ModelConfig, patch_size: int, channels_last: bool = False) -> "StudentInput":
        """How the student of `cfg` takes its input, patches cut at the cache's `patch_size`."""
        return cls(cfg.image_size, int(patch_size), cfg.in_chans, tuple(cfg.mean), tuple(cfg.std), channels_last)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1, r, r) in [0, 1] -> what the backbone takes: ImageNet-normalised RGB or one channel."""
        x = normalise_input(pixels, self.in_chans, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def render(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The batch's images (and, for pairs, its patches after them) as backbone input."""
        images = batch["image"].to(device, non_blocking=True)
        pixels = render_images(images, batch["image_hw"], batch["image_params"], self.image_size)
        if "patch_box" in batch:
            patches = render_patches(images, batch["image_hw"], batch["patch_box"], batch["patch_params"],
                                     self.patch_size, self.image_size)
            pixels = torch.cat([pixels, patches])
        return self.normalise(pixels)


class DistillationStep:
    """Forward and loss for one micro-batch: L = sum over branches (and image/patch) of the loss
    (the paper's MSE, or its cross-entropy ablation)."""

    def __init__(self, student_input: StudentInput, target_norm: TargetNorm, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, loss: LossConfig | None = None):
        self.input = student_input
        self.norm = target_norm
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.loss = loss or LossConfig()

    def branch_loss(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.loss.kind == "cross_entropy":
            return masked_cross_entropy(pred, target, valid, self.loss.student_temperature, self.loss.teacher_temperature)
        return masked_mse(pred, target, valid)

    def __call__(self, net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.input.render(batch, self.device)
        n = batch["image"].shape[0]
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            outputs = net(x)
        parts: dict[str, torch.Tensor] = {}
        for name, out in outputs.items():
            pred = self.norm.predictions(out)
            parts[f"{name}/image"] = self.branch_loss(
                pred[:n], self.norm.targets(name, batch["targets"][name].to(self.device, non_blocking=True)),
                batch["valid"][name])
            if "patch_box" in batch:
                parts[f"{name}/patch"] = self.branch_loss(
                    pred[n:], self.norm.targets(name, batch["patch_targets"][name].to(self.device, non_blocking=True)),
                    batch["patch_valid"][name])
        return torch.stack(list(parts.values())).sum(), parts
