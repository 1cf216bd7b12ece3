"""crop_patch: the one way every stage cuts a patch out of an image.

The shard builder plans patch boxes, the precompute renders them for the teachers, the trainer and
the evaluation cut them again; all of them call this, so a patch is the same pixels everywhere.

Pixel-centre convention: pixel (i, j) covers [j, j+1] x [i, i+1], so the box [0, 0, W, H] is the
whole image and cropping it at its own size gives the image back. The box is resampled bilinearly
(align_corners=False) onto out x out pixels, with zeros (black) outside the image and the same
antialiasing as `replay_views` when the box is larger than the output. Both the numpy and the
torch entry points run the same torch code.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from leader.errors import LeaderError
from leader.views import to_unit_float, warp_affine


def _box_theta(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, 4) pixel boxes -> (B, 2, 3) output-to-input affine in grid_sample coordinates.

    Output coordinate o in [-1, 1] covers the box: x = x0 + (o + 1) / 2 * (x1 - x0), and
    grid_sample's input coordinate is 2 x / W - 1 (align_corners=False).
    """
    x0, y0, x1, y1 = boxes.T
    theta = np.zeros((len(boxes), 2, 3), dtype=np.float64)
    theta[:, 0, 0] = (x1 - x0) / width
    theta[:, 0, 2] = (x0 + x1) / width - 1.0
    theta[:, 1, 1] = (y1 - y0) / height
    theta[:, 1, 2] = (y0 + y1) / height - 1.0
    return theta


def _check_boxes(boxes: np.ndarray, height: int, width: int) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise LeaderError(f"crop_patch: boxes must be (B, 4) [x0, y0, x1, y1], got shape {boxes.shape}")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        where = f"crop_patch: box {i} [{x0:g}, {y0:g}, {x1:g}, {y1:g}]"
        if not np.isfinite([x0, y0, x1, y1]).all():
            raise LeaderError(f"{where} has a non-finite coordinate")
        if x1 <= x0 or y1 <= y0:
            raise LeaderError(f"{where} is empty or inverted (needs x1 > x0 and y1 > y0)")
        # Partly outside is normal (patches are squared past the border and padded black);
        # entirely outside can only be a bug upstream, and would silently yield a black patch.
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise LeaderError(f"{where} lies entirely outside the {width}x{height} image")


def _crop_batch(
    images: torch.Tensor, boxes: torch.Tensor | np.ndarray, out_size: int, max_value: float | None
) -> torch.Tensor:
    x = to_unit_float(images, max_value)
    if x.dim() != 4 or x.shape[1] != 1:
        raise LeaderError(f"crop_patch: images must be (B, 1, H, W), got {tuple(x.shape)}")
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().to("cpu", torch.float64).numpy()
    boxes = np.asarray(boxes, dtype=np.float64)
    _, _, height, width = x.shape
    _check_boxes(boxes, height, width)
    if x.shape[0] == 1 and len(boxes) > 1:
        # Many patches of one image: broadcast the image instead of asking for copies.
        x = x.expand(len(boxes), -1, -1, -1)
    if x.shape[0] != len(boxes):
        raise LeaderError(f"crop_patch: {x.shape[0]} images but {len(boxes)} boxes")
    return warp_affine(x, _box_theta(boxes, height, width), out_size)


def crop_patch(
    image: np.ndarray | torch.Tensor,
    box: Sequence[float] | np.ndarray | torch.Tensor,
    out_size: int,
    *,
    max_value: float | None = None,
) -> np.ndarray | torch.Tensor:
    """Cut box [x0, y0, x1, y1] (stored-image pixels) out of an image and resample it to out x out.

    numpy: image (H, W) uint8/uint16/float, one box -> (out, out) float32 ndarray in [0, 1].
    torch: images (B, 1, H, W) (or (1, 1, H, W) shared by all boxes), boxes (B, 4) tensor or
      ndarray -> (B, 1, out, out) float tensor in [0, 1] on the images' device (float64 stays float64).
    uint8 is divided by 255, uint16 by 65535, float is taken as [0, 1]; max_value overrides.
    Area outside the image is 0. A box that is empty, non-finite or wholly outside is a LeaderError.
    """
    out_size = int(out_size)
    if out_size < 1:
        raise LeaderError(f"crop_patch: out_size must be positive, got {out_size}")
    if isinstance(image, torch.Tensor):
        return _crop_batch(image, box, out_size, max_value)
    image = np.asarray(image)
    if image.ndim != 2:
        raise LeaderError(f"crop_patch: a numpy image must be 2-D (H, W), got shape {image.shape}")
    if hasattr(box, "as_list"):                      # a records.Box
        box = box.as_list()
    one_box = np.asarray(box, dtype=np.float64).reshape(1, -1)
    patch = _crop_batch(torch.from_numpy(np.require(image, requirements=["C", "W"]))[None, None], one_box,
                        out_size, max_value)
    return patch[0, 0].to(torch.float32).numpy()
