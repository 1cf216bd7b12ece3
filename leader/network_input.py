"""What a network is fed: grayscale views in [0, 1] turned into its normalised input channels.

    x = normalise_input(pixels, in_chans=3)               # (B, 1, H, W) -> (B, 3, H, W), ImageNet stats

Every network here (the student, a fine-tuned backbone, a timm teacher) sees radiographs the same
way: one grayscale channel in [0, 1], replicated to RGB and normalised with the ImageNet mean and
std, as ImageNet-initialised CXR models are trained; a one-channel network gets the channel means.
"""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_input(pixels: torch.Tensor, in_chans: int = 3, mean: tuple = IMAGENET_MEAN,
                    std: tuple = IMAGENET_STD) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, in_chans, H, W): replicated and normalised, or one channel."""
    mean_t = torch.tensor(mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    if in_chans == 1:
        return (pixels - mean_t.mean()) / std_t.mean()
    return (pixels.expand(-1, 3, -1, -1) - mean_t) / std_t
