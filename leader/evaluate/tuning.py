"""One fine-tuning loop for every downstream task.

    task = ClassificationTask(...)            # or SegmentationTask(...): model, loss, inputs, score
    log = fit(task, Recipe(epochs=20), seed=0, device="cuda")
    # task.model now holds the weights of its best validation epoch

A task owns what differs between classification and segmentation: the network, how a batch of
training images (and masks) is rendered from a view, the loss, and the validation score that picks
the best epoch. The loop owns the rest, the same for both:
- AdamW; the pretrained backbone at `lr`, the parts that start from scratch (a classification
  head, a segmentation decoder) at `lr * head_lr_scale`;
- linear warm-up over `warmup_epochs`, then cosine decay to zero (`leader.schedule`);
- each epoch shows every training image through a fresh random view, drawn from (seed, epoch,
  key): the paper's augmentations, replayed by `replay_views` (and `replay_mask_views` for masks);
- after each epoch the validation score; training stops when it has not improved for `patience`
  epochs, and the best epoch's weights are kept; with `select_start` the starting weights are
  scored first and kept when no epoch beats them (LP-FT starts from a fitted probe, which
  fine-tuning should improve, not replace with something worse; the log's best_epoch is then -1);
- a pretrained backbone keeps its BatchNorm statistics (`keep_norm_stats`); a randomly initialised
  one learns them;
- on CUDA, bf16 autocast and channels_last; the CPU trains in float32.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from leader.errors import LeaderError
from leader.schedule import warmup_cosine
from leader.views import IDENTITY, ViewSpec, sample_view_params


@dataclass
class Recipe:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-4                 # the pretrained backbone's
    head_lr_scale: float = 10.0      # what starts from scratch learns this much faster
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    patience: int = 5                # epochs without a better validation score before stopping
    augment: bool = True             # random views of the training images
    keep_norm_stats: bool = True     # a pretrained backbone's BatchNorm statistics stay as trained
    select_start: bool = False       # the starting weights compete with the epochs on validation

    def check(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise LeaderError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise LeaderError("batch_size must be at least 2 (BatchNorm cannot train on one image)")
        if not self.lr > 0 or not self.head_lr_scale > 0:
            raise LeaderError(f"lr and head_lr_scale must be positive, got {self.lr} and {self.head_lr_scale}")
        if self.warmup_epochs < 0:
            raise LeaderError(f"warmup_epochs must not be negative, got {self.warmup_epochs}")


class Task(Protocol):
    """What `fit` needs from a downstream task."""

    model: nn.Module
    pretrained: nn.Module | None     # the part of `model` that starts from trained weights (None: none)
    train_keys: list[str]            # the training images' item keys: their views derive from them
    score_name: str                  # the validation score's name in the log, e.g. "val_auc"

    def parameter_groups(self) -> tuple[Iterable[nn.Parameter], Iterable[nn.Parameter]]:
        """(pretrained parameters, parameters that start from scratch)."""

    def batch(self, index: np.ndarray, params: np.ndarray, device: torch.device) -> tuple[torch.Tensor, Any]:
        """(network input, target) of training images `index` seen through views `params` (n, K)."""

    def loss(self, output: torch.Tensor, target: Any) -> torch.Tensor:
        """The training loss of a batch (output in float32)."""

    def validate(self, device: torch.device) -> float:
        """The validation score, higher is better; NaN when the validation split cannot tell."""


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing elsewhere (the CPU trains and predicts in float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def fit(task: Task, recipe: Recipe, seed: int, device: str | torch.device = "cpu",
        on_epoch: Callable[[int], None] | None = None) -> dict:
    """Train `task.model` by the recipe; leaves it at its best validation epoch; -> the training log."""
    recipe.check()
    device = torch.device(device)
    model = task.model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    pretrained, fresh = task.parameter_groups()
    optimizer = torch.optim.AdamW([
        {"params": list(pretrained), "lr": recipe.lr},
        {"params": list(fresh), "lr": recipe.lr * recipe.head_lr_scale},
    ], weight_decay=recipe.weight_decay)
    n = len(task.train_keys)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    warmup = max(1, round(recipe.warmup_epochs * steps_per_epoch)) if recipe.warmup_epochs else 0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))
    spec, rng = ViewSpec(), np.random.default_rng(seed)
    best_score, best_epoch, best_state = -math.inf, -1, None
    log: dict = {task.score_name: [], "train_loss": []}
    if recipe.select_start:
        model.eval()
        start = task.validate(device)
        log["start_" + task.score_name] = start
        if not np.isnan(start):
            best_score, best_state = start, copy.deepcopy(model.state_dict())
    for epoch in range(recipe.epochs):
        model.train()
        if recipe.keep_norm_stats and task.pretrained is not None:
            keep_norm_statistics(task.pretrained)
        order = rng.permutation(n)
        params = (sample_view_params(spec, seed * 100_003 + epoch, task.train_keys, 2)[:, 1] if recipe.augment
                  else np.repeat(IDENTITY[None], n, 0))
        losses = []
        for start in range(0, n, recipe.batch_size):
            index = order[start:start + recipe.batch_size]
            if len(index) < 2:
                continue                                   # BatchNorm cannot train on a single image
            inputs, target = task.batch(index, params[index], device)
            with autocast(device):
                output = model(prepare_input(inputs, device))
            loss = task.loss(output.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        score = task.validate(device)
        log["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        log[task.score_name].append(score)
        if on_epoch:
            on_epoch(1)
        # A validation split that cannot score (NaN) selects nothing: keep the last epoch.
        if np.isnan(score) or score > best_score or best_state is None:
            best_score = score if not np.isnan(score) else -math.inf
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= recipe.patience:
            if on_epoch:
                on_epoch(recipe.epochs - epoch - 1)           # the epochs early stopping saved
            break
    model.load_state_dict(best_state)
    log.update(best_epoch=best_epoch, epochs_run=len(log[task.score_name]))
    return log


def keep_norm_statistics(module: nn.Module) -> None:
    """Put the BatchNorm layers of `module` in eval mode: they normalise with their trained running
    statistics and stop updating them, while their scale and shift still learn.

    Training mode would re-estimate the statistics from the fine-tuning batches (momentum 0.1, so
    within an epoch) and move every feature the backbone produces, whatever the learning rate. On
    the demo's student one epoch at a learning rate of 1e-12 took the linear-probe head's test AUC
    from 0.777 to 0.752: the head, fitted on the trained statistics, no longer fits the features.
    """
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


@torch.no_grad()
def predict(model: nn.Module, inputs: Callable[[slice], torch.Tensor], n: int, batch_size: int,
            device: torch.device, activation: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid) -> torch.Tensor:
    """activation(model(inputs(batch))) over n items in eval mode, on the CPU, float32."""
    model.eval()
    out = []
    for start in range(0, n, batch_size):
        with autocast(device):
            logits = model(prepare_input(inputs(slice(start, start + batch_size)).to(device), device))
        out.append(activation(logits.float()).cpu())
    return torch.cat(out) if out else torch.zeros(0)
