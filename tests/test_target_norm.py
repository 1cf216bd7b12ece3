"""Target normalisation: how teacher embeddings are put on one scale before the MSE."""
from __future__ import annotations

import torch

from leader.train.model import TargetNorm


def test_l2_compares_directions_only():
    norm = TargetNorm("l2", {"disease": 3})
    t = torch.tensor([[3.0, 0.0, 4.0]])
    torch.testing.assert_close(norm.targets("disease", t), torch.tensor([[0.6, 0.0, 0.8]]))
    torch.testing.assert_close(norm.predictions(2 * t), torch.tensor([[0.6, 0.0, 0.8]]))


def test_standardize_floors_dimensions_that_are_dead_on_images():
    """A dimension with a tiny image std must not blow up the loss on patches where it is alive."""
    mean, std = torch.zeros(4), torch.tensor([1.0, 2.0, 1e-9, 3.0])
    norm = TargetNorm("standardize", {"anatomy": 4}, {"anatomy": (mean, std)})
    out = norm.targets("anatomy", torch.tensor([[1.0, 2.0, 0.5, 3.0]]))
    # torch's median of (1e-9, 1, 2, 3) is 1, so the dead dimension's std is floored at 0.1: 0.5 / 0.1.
    torch.testing.assert_close(out[0, 2], torch.tensor(5.0))
    torch.testing.assert_close(out[0, [0, 1, 3]], torch.tensor([1.0, 1.0, 1.0]))
