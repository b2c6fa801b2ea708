"""The epoch metric that training, validation and test each update once a step."""

import torch
from torchmetrics import Metric


class LossAndAccuracy(Metric):
    """An epoch's mean loss and accuracy, summed over DDP ranks, from one update per step.

    MeanMetric plus MulticlassAccuracy give the same figures from two updates whose argument handling
    cost about 0.1 ms a training step on a 2-core CPU, a tenth of the step at batch 64.
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("loss_sum", "correct", "count"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        if not len(target):  # a DDP rank's empty share of a tiny set: its mean loss is NaN, and counts 0
            return
        # No NaN test here (it would wait for the device every step): a NaN loss makes the mean NaN.
        # In place, the batch size as add_'s alpha: no temporary, and no `self.x = ...` through
        # nn.Module.__setattr__ (18 -> 13 us an update on a 2-core CPU).
        self.loss_sum.add_(loss.detach(), alpha=len(target))
        self.correct.add_((logits.argmax(1) == target).sum())
        self.count.add_(len(target))

    def compute(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss_sum / self.count, "acc": self.correct / self.count}
