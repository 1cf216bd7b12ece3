"""The student: a timm backbone and one 2-layer MLP head per teacher, plus target normalisation.

    student = create_student(cfg.model, head_dims={"disease": 1376, "anatomy": 2048})
    features, outputs = student(x, branches=("disease",))     # E_DA and {"disease": E'_D}

Head widths come from the cache (each teacher's `dim`), never from the config, so a student is
always shaped for the targets it is trained on.
"""
from __future__ import annotations

from typing import Iterable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from leader.errors import LeaderError
from leader.train.config import ModelConfig


class MLPHead(nn.Sequential):
    """Linear -> GELU -> Linear: the paper's h_D / h_A."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, head_dims: dict[str, int], hidden: int):
        super().__init__()
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        self.heads = nn.ModuleDict({name: MLPHead(self.num_features, hidden, dim) for name, dim in head_dims.items()})

    @property
    def head_dims(self) -> dict[str, int]:
        return {name: head[-1].out_features for name, head in self.heads.items()}

    def forward(self, x: torch.Tensor, branches: Iterable[str] | None = None):
        features = self.backbone(x)
        names = self.heads.keys() if branches is None else branches
        return features, {name: self.heads[name](features) for name in names}

    def restricted(self, branches: Iterable[str]) -> "BranchView":
        return BranchView(self, list(branches))


class BranchView(nn.Module):
    """The backbone and the active heads only, sharing the student's modules.

    DDP wraps this per phase: a head that a phase does not train would otherwise be a parameter
    without a gradient, which DDP treats as an error (or must search for every step).
    """

    def __init__(self, student: Student, branches: list[str]):
        super().__init__()
        missing = [b for b in branches if b not in student.heads]
        if missing:
            raise LeaderError(f"the student has no head for {missing}; heads: {list(student.heads)}")
        self.backbone = student.backbone
        self.heads = nn.ModuleDict({b: student.heads[b] for b in branches})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {name: head(features) for name, head in self.heads.items()}


def create_backbone(cfg: ModelConfig) -> nn.Module:
    kwargs = dict(cfg.kwargs)
    if cfg.pretrained_file:
        # Local weights only: timm reads the file, never the hub (DESIGN.md section 8).
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(cfg.pretrained_file), "num_classes": 0})
    try:
        return timm.create_model(cfg.name, num_classes=0, in_chans=cfg.in_chans, **kwargs)
    except RuntimeError as e:
        raise LeaderError(f"model.name {cfg.name!r}: {e}") from None
    except TypeError as e:
        raise LeaderError(f"model.kwargs {cfg.kwargs} do not fit timm model {cfg.name!r}: {e}") from None
    except FileNotFoundError as e:
        raise LeaderError(f"model.pretrained_file: {e}") from None


def create_student(cfg: ModelConfig, head_dims: dict[str, int]) -> Student:
    return Student(create_backbone(cfg), head_dims, cfg.head_hidden)


class TargetNorm(nn.Module):
    """How targets (and predictions) are put on a common scale before the MSE.

    l2: both unit-normalised, as the paper's code does (the loss then depends on direction only).
    standardize: targets centred and scaled per dimension with the cache's train statistics.
    none: raw values.
    The statistics are buffers, so they travel in checkpoints and exports with the heads.
    """

    def __init__(self, mode: str, dims: dict[str, int], stats: dict[str, tuple] | None = None):
        super().__init__()
        self.mode = mode
        for name, dim in dims.items():
            mean, std = (stats or {}).get(name, (torch.zeros(dim), torch.ones(dim)))
            std = torch.as_tensor(std, dtype=torch.float32).reshape(dim).clone()
            # A dimension that is (nearly) dead on whole images can be alive on patches; dividing by
            # its tiny image std would blow the patch loss up by orders of magnitude. Floor each std
            # at a tenth of the median one.
            alive = std[std > 0]
            if alive.numel():
                std = std.clamp_min(0.1 * float(alive.median()))
            self.register_buffer(f"mean_{name}", torch.as_tensor(mean, dtype=torch.float32).reshape(dim).clone())
            self.register_buffer(f"std_{name}", std)

    def targets(self, name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        if self.mode == "l2":
            return F.normalize(t, dim=-1)
        if self.mode == "standardize":
            return (t - getattr(self, f"mean_{name}")) / getattr(self, f"std_{name}").clamp_min(1e-6)
        return t

    def predictions(self, p: torch.Tensor) -> torch.Tensor:
        p = p.float()
        return F.normalize(p, dim=-1) if self.mode == "l2" else p
