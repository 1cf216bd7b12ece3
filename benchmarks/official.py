"""The official LeADER code's data path, reimplemented for comparison (docs/design.md, section 6).

Per sample and step it opens the original-size image file, converts it to RGB, applies the paper's
augmentations with torchvision at full resolution, resizes to the student's input, and reads the
disease target from `<image stem>.npy`, computed once on the un-augmented image. Our design
replaces all of this with shards at the stored size, one cache block per shard and views replayed
in a batch; the loader benchmark runs both on the same images.

    loader = official_loader(paths, targets_dir, image_size=224, batch_size=64, num_workers=8)
    for pixels, targets, stems in loader: ...   # (B, 3, 224, 224) normalised, (B, D) float32, file stems
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from leader.errors import LeaderError
from leader.network_input import IMAGENET_MEAN, IMAGENET_STD
from leader.views import ViewSpec



def official_transform(image_size: int, spec: ViewSpec = ViewSpec()) -> transforms.Compose:
    """The paper's augmentations (random affine, h-flip, colour jitter), with our view ranges."""
    return transforms.Compose([
        transforms.RandomAffine(degrees=spec.rotation_deg, translate=(spec.translate, spec.translate),
                                scale=tuple(spec.scale), shear=spec.shear_deg),
        transforms.RandomHorizontalFlip(spec.hflip_p),
        transforms.ColorJitter(brightness=spec.brightness, contrast=spec.contrast),
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class PerFileDataset(Dataset):
    """One original image file plus one .npy target file per sample, and the file's stem (which
    image it was, for the benchmarks that check both pipelines saw the same images)."""

    def __init__(self, image_paths: list[Path], targets_dir: Path, image_size: int):
        self.image_paths = [Path(p) for p in image_paths]
        self.targets_dir = Path(targets_dir)
        self.transform = official_transform(image_size)
        missing = [p.stem for p in self.image_paths[:1000] if not (self.targets_dir / f"{p.stem}.npy").exists()]
        if missing:
            raise LeaderError(f"official targets: {self.targets_dir} lacks {missing[0]}.npy "
                              f"({len(missing)} of the first {min(len(self.image_paths), 1000)} images have none)")

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        path = self.image_paths[index]
        with Image.open(path) as image:
            pixels = self.transform(image.convert("RGB"))
        target = np.load(self.targets_dir / f"{path.stem}.npy")
        return pixels, torch.from_numpy(target), path.stem


def official_loader(image_paths: list[Path], targets_dir: Path, image_size: int, batch_size: int,
                    num_workers: int, pin_memory: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(PerFileDataset(image_paths, targets_dir, image_size), batch_size=batch_size, shuffle=True,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=True, generator=generator)
