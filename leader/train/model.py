"""The student: a timm backbone and one head per teacher, plus target normalisation.

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
        self.out_features = out_dim


class DinoHead(nn.Module):
    """The head of the authors' released code (DINO's projection head): an MLP to a bottleneck,
    L2-normalised, then a weight-normalised linear layer with its norms fixed at 1 (each output is
    the cosine to a learned unit direction), L2-normalised again.

    layers 1 is a single Linear to the bottleneck (the code's default `--head_layers 1`); more add
    hidden Linear-GELU layers of width `hidden` before it.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2, bottleneck: int = 256):
        super().__init__()
        widths = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks.append(nn.Linear(widths[i], widths[i + 1]))
            if i < layers - 1:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.directions = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.kaiming_uniform_(self.directions, a=5 ** 0.5)        # nn.Linear's own initialisation
        self.out_features = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.normalize(F.linear(x, F.normalize(self.directions, dim=1)), dim=-1)


def create_head(cfg: ModelConfig, in_dim: int, out_dim: int) -> nn.Module:
    if cfg.head == "dino":
        return DinoHead(in_dim, cfg.head_hidden, out_dim, cfg.head_layers, cfg.head_bottleneck)
    return MLPHead(in_dim, cfg.head_hidden, out_dim)


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        self.heads = nn.ModuleDict(heads)

    @property
    def head_dims(self) -> dict[str, int]:
        return {name: head.out_features for name, head in self.heads.items()}

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
        # Local weights only: timm reads the file, never the hub.
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
    """The student a config describes, with one head per teacher sized to that teacher's targets."""
    backbone = create_backbone(cfg)
    width = int(backbone.num_features)
    return Student(backbone, {name: create_head(cfg, width, dim) for name, dim in head_dims.items()})


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
