"""The fine-tuning loop shared by classification and segmentation, on a toy task: what it keeps of a
pretrained backbone, which epoch it ends at, and when it stops."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from leader.evaluate.tuning import Recipe, fit
from leader.views import replay_views


class BrightnessTask:
    """Tell bright 16-px images from dark ones; the validation scores are scripted."""

    score_name = "val_score"

    def __init__(self, pretrained: bool, scores: list[float]):
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.model = nn.Sequential(self.backbone, nn.Linear(4, 1))
        self.pretrained = self.backbone if pretrained else None
        labels = torch.arange(24) % 2
        self.images = (0.3 + 0.4 * labels.float()).view(-1, 1, 1, 1).expand(24, 1, 16, 16).clone()
        self.labels = labels.float()[:, None]
        self.train_keys = [f"toy/{i}" for i in range(24)]
        self.scores, self.epoch = list(scores), 0

    def parameter_groups(self):
        return self.backbone.parameters(), self.model[1].parameters()

    def batch(self, index, params, device):
        return replay_views(self.images[index], params, 16), self.labels[index]

    def loss(self, output, target):
        return nn.functional.binary_cross_entropy_with_logits(output, target)

    def validate(self, device):
        score = self.scores[self.epoch]
        self.epoch += 1
        return score


def test_a_pretrained_backbone_keeps_its_batchnorm_statistics_and_a_random_one_learns_them():
    for pretrained in (True, False):
        task = BrightnessTask(pretrained, [0.5] * 3)
        norm = task.backbone[1]
        before = norm.running_mean.clone(), norm.weight.detach().clone()
        fit(task, Recipe(epochs=3, batch_size=8, lr=1e-2), seed=0)
        assert torch.equal(norm.running_mean, before[0]) == pretrained
        assert not torch.equal(norm.weight, before[1])          # its scale learns either way


def test_the_model_ends_at_its_best_validation_epoch_and_stops_after_patience():
    task = BrightnessTask(True, [0.6, 0.9, 0.7, 0.8, 0.85, 0.99])
    snapshots = []
    validate = task.validate
    task.validate = lambda device: (snapshots.append({k: v.clone() for k, v in task.model.state_dict().items()}),
                                    validate(device))[1]
    log = fit(task, Recipe(epochs=6, batch_size=8, lr=1e-2, patience=3), seed=0)
    # Epochs 2, 3 and 4 fail to beat epoch 1's 0.9: stopped after epoch 4, weights of epoch 1.
    assert log["epochs_run"] == 5 and log["best_epoch"] == 1 and log["val_score"] == [0.6, 0.9, 0.7, 0.8, 0.85]
    assert all(torch.equal(v, snapshots[1][k]) for k, v in task.model.state_dict().items())
    assert np.isfinite(log["train_loss"]).all()


def test_with_select_start_the_starting_weights_stay_when_no_epoch_beats_them_on_validation():
    # The start scores 0.8; epochs score 0.6 and 0.7, and patience 2 ends the run after them.
    task = BrightnessTask(True, [0.8, 0.6, 0.7, 0.95])
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    log = fit(task, Recipe(epochs=4, batch_size=8, lr=1e-2, patience=2, select_start=True), seed=0)
    assert log["start_val_score"] == 0.8 and log["val_score"] == [0.6, 0.7]
    assert log["best_epoch"] == -1 and log["epochs_run"] == 2
    assert all(torch.equal(v, start[k]) for k, v in task.model.state_dict().items())
    # Beaten, the start gives way as any epoch would.
    task = BrightnessTask(True, [0.5, 0.6, 0.7])
    log = fit(task, Recipe(epochs=2, batch_size=8, lr=1e-2, patience=2, select_start=True), seed=0)
    assert log["best_epoch"] == 1 and log["start_val_score"] == 0.5
