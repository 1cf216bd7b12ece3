"""Annotation frames: the image size a dataset's boxes and landmarks were drawn on.

A dataset states its annotations in the pixels of the images it released (NIH's
`BBox_List_2017.csv` and ChestX-Det's JSON: 1024 x 1024), but many copies in use are resized
(torchxrayvision ships NIH at 512 px). An adapter therefore names the frame its annotations are
given in, and the builder scales them to the file it actually read when the two shapes agree in
aspect. A file of another aspect is not the image the annotations describe: it is rejected, with
both shapes in the reason. A record without a frame is annotated in the file's own pixels.
"""
from __future__ import annotations

from leader.shards.records import Box

# Resizing rounds each side to whole pixels: 1024 x 1024 becomes 512 x 512, 2500 x 2048 becomes
# 625 x 512 (aspect off by 0.1%). Anything further off is a cropped or padded image.
ASPECT_TOLERANCE = 0.01


def frame_scale(frame: tuple[int, int] | None, height: int, width: int) -> tuple[float, float]:
    """(x scale, y scale) from the annotation frame to a height x width file; ValueError if they disagree."""
    if frame is None:
        return 1.0, 1.0
    frame_h, frame_w = frame
    if (frame_h, frame_w) == (height, width):
        return 1.0, 1.0
    if frame_h <= 0 or frame_w <= 0:
        raise ValueError(f"annotation frame {frame_w}x{frame_h} is empty")
    aspect_file, aspect_frame = width / height, frame_w / frame_h
    if abs(aspect_file / aspect_frame - 1.0) > ASPECT_TOLERANCE:
        raise ValueError(
            f"annotations are given on a {frame_w}x{frame_h} image but the file is {width}x{height}: "
            f"its aspect {aspect_file:.3f} differs from {aspect_frame:.3f}, so it is not a resized copy"
        )
    return width / frame_w, height / frame_h


def scale_box(box: Box, sx: float, sy: float) -> Box:
    if (sx, sy) == (1.0, 1.0):
        return box
    return Box(box.label, box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy, source_label=box.source_label)


def scale_points(points: dict[str, tuple[float, float]] | None, sx: float, sy: float):
    if points is None or (sx, sy) == (1.0, 1.0):
        return points
    return {name: (x * sx, y * sy) for name, (x, y) in points.items()}
