"""An exponential moving average of the student's weights: what a run hands out when it keeps one.

    average = WeightAverage.start(student, decay=0.995)
    ...                                   # after every optimizer step:
    average.update(student)
    Checkpoint(..., weight_average=average.state_dict()).save(run)
    weights = Checkpoint.load(run).inference_weights()   # the average if the run kept one

Training always continues from the raw weights, so a resumed run follows the same loss curve with
or without an average; the average is saved beside them and continues from where it was.
Evaluation, `leader embed` and `leader export` take `Checkpoint.inference_weights()`. Floating-point buffers
(BatchNorm's running mean and variance) are averaged like the weights, other buffers are copied.

The decay starts low, min(decay, (1 + n) / (10 + n)) after n updates, so the average does not keep
the random initialisation: it spans about 1 / (1 - decay) of the last steps once n is large.
"""
from __future__ import annotations

import torch
from torch import nn

from leader.errors import LeaderError

class WeightAverage:
    def __init__(self, decay: float, weights: dict[str, torch.Tensor], updates: int = 0):
        if not 0.0 < decay < 1.0:
            raise LeaderError(f"optim.ema_decay must be in (0, 1) to keep a weight average, got {decay}")
        self.decay, self.weights, self.updates = decay, weights, updates

    @classmethod
    def start(cls, model: nn.Module, decay: float) -> "WeightAverage":
        return cls(decay, {k: v.detach().clone() for k, v in model.state_dict().items()})

    @classmethod
    def resume(cls, saved: dict, model: nn.Module, decay: float) -> "WeightAverage":
        """From a checkpoint's entry, on the model's device."""
        reference = model.state_dict()
        if set(saved["weights"]) != set(reference):
            raise LeaderError("the checkpoint's weight average does not match the model's parameters")
        return cls(decay, {k: v.to(reference[k].device) for k, v in saved["weights"].items()}, int(saved["updates"]))

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average, as two multi-tensor operations (one per tensor costs a Swin-B
        step some 600 kernel launches)."""
        decay = self.current_decay()
        averages, values = [], []
        for name, value in model.state_dict().items():
            average = self.weights[name]
            if average.is_floating_point():
                averages.append(average)
                values.append(value)
            else:
                average.copy_(value)
        if averages:
            torch._foreach_mul_(averages, decay)
            torch._foreach_add_(averages, values, alpha=1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"weights": self.weights, "updates": self.updates, "decay": self.decay}
