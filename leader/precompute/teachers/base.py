"""The contract every teacher keeps with the precompute loop (docs/interfaces.md, "Teachers").

A teacher turns rendered views into embeddings (`embed`), or, for teachers that only import
embeddings users already hold, finds them by image id (`lookup`). `embed` checks what goes in and
what comes out, so that a wrong batch or a NaN embedding stops the run with the teacher's name on
it instead of landing in the cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from leader.errors import LeaderError

class Teacher:
    kind: str = ""
    dim: int
    input_size: int | None = None
    needs_pixels: bool = True
    max_views: int | None = None   # None: any number of views; import teachers only have view 0
    fingerprint: str
    preprocessing: dict[str, Any]

    def embed(self, pixels: torch.Tensor, bits: int = 8) -> np.ndarray:
        """Embed a batch of rendered views.

        pixels: (B, 1, S, S) float32 in [0, 1]. bits: bit depth of the stored PNG (8 or 16), which
        some teachers' own preprocessing depends on. Returns (B, dim) float32.
        """
        if not self.needs_pixels:
            raise LeaderError(f"teacher {self.kind!r} reads stored embeddings; call lookup(image_ids), not embed()")
        if bits not in (8, 16):
            raise LeaderError(f"teacher {self.kind!r}: bits must be 8 or 16, got {bits}")
        self._check_pixels(pixels)
        out = np.asarray(self._embed(pixels, bits), dtype=np.float32)
        if out.shape != (pixels.shape[0], self.dim):
            raise LeaderError(f"teacher {self.kind!r} returned shape {out.shape}, expected {(pixels.shape[0], self.dim)}")
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out).all(axis=1)).sum())
            raise LeaderError(f"teacher {self.kind!r} produced non-finite embeddings for {bad} of {len(out)} views")
        return out

    def lookup(self, image_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        raise LeaderError(f"teacher {self.kind!r} computes embeddings from pixels; it has no lookup by image id")

    def describe(self) -> dict[str, Any]:
        """What the cache stores about this teacher, so a trainer can refuse a mismatched cache."""
        return {"kind": self.kind, "dim": self.dim, "input_size": self.input_size,
                "fingerprint": self.fingerprint, "preprocessing": self.preprocessing}

    def close(self) -> None:
        """Release the model. Teachers holding nothing heavy have nothing to do."""

    def __enter__(self) -> "Teacher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _embed(self, pixels: torch.Tensor, bits: int) -> np.ndarray:
        raise NotImplementedError

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if not isinstance(pixels, torch.Tensor):
            raise LeaderError(f"teacher {self.kind!r} expects a torch tensor of pixels, got {type(pixels).__name__}")
        if pixels.ndim != 4 or pixels.shape[1] != 1 or pixels.shape[2] != pixels.shape[3] or pixels.shape[0] == 0:
            raise LeaderError(f"teacher {self.kind!r} expects pixels shaped (B, 1, S, S) with B > 0, got {tuple(pixels.shape)}")
        if not pixels.is_floating_point():
            raise LeaderError(f"teacher {self.kind!r} expects float pixels in [0, 1], got {pixels.dtype}")


def is_remote(model: str | Path) -> bool:
    """A URL (any scheme) rather than a path on this machine."""
    return "://" in str(model)


def local_model_path(model: str | Path | None, kind: str, *, want: str, remote_possible: bool = True) -> Path:
    """The existing local file or directory `model` names; anything else is refused.

    Teachers never reach the network unless the user asks explicitly (docs/design.md, section 9), so a URL
    or hub handle is refused here, naming the flag that allows it where the teacher can load one.
    want: "file" or "dir".
    """
    if model is None or str(model) == "":
        raise LeaderError(f"teacher {kind!r} needs a model path (--model)")
    if is_remote(model):
        how = ("pass --allow-remote to load from a URL" if remote_possible
               else "this teacher loads local checkpoints only; download it first")
        raise LeaderError(f"teacher {kind!r}: model {str(model)!r} is not a local path; {how}")
    path = Path(model).expanduser()
    if not path.exists():
        raise LeaderError(f"teacher {kind!r}: model path {str(path)!r} does not exist")
    if want == "dir" and not path.is_dir():
        raise LeaderError(f"teacher {kind!r}: model path {str(path)!r} must be a directory")
    if want == "file" and not path.is_file():
        raise LeaderError(f"teacher {kind!r}: model path {str(path)!r} must be a file")
    return path
