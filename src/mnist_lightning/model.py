"""The LightningModule: steps 3 to 5 of the tutorial (the loss, the optimiser, the training loop's steps) around
the network of step 2, with loss and accuracy per epoch."""

from typing import Literal

import lightning as L
import torch
from torchmetrics import MaxMetric

from mnist_lightning.errors import UserError
from mnist_lightning.metrics import LossAndAccuracy
from mnist_lightning.net import MLP
from mnist_lightning.training.speedups import SmoothedCrossEntropy


class MNISTClassifier(L.LightningModule):
    """Steps 3 to 5: the MLP, cross-entropy and Adam; the defaults are the project's recipe.

    Args:
        hidden1: width of the first hidden layer.
        hidden2: width of the second hidden layer.
        lr: Adam's learning rate; the peak rate when ``scheduler`` is ``onecycle``.
        weight_decay: decoupled weight decay (AdamW): each step shrinks the weights by ``lr * weight_decay``.
            Adam's L2 penalty would pass through its gradient scaling, which leaves the weights with large
            gradients barely decayed; AdamW decays every weight alike. 0: plain Adam.
        scheduler: ``onecycle`` warms up to ``lr`` and anneals, stepping per batch; ``none`` keeps it fixed.
        warmup: with ``onecycle``, the fraction of the steps spent warming up to ``lr``.
        label_smoothing: weight moved from the true class onto all ten, in the cross-entropy target.
        compile: run the network through ``torch.compile`` (the first steps compile).
        compile_mode: torch.compile's mode, with ``compile``; ``reduce-overhead`` also replays the network's
            forward and backward as CUDA graphs, for a GPU that spends the step launching kernels.
    """

    def __init__(
        self,
        hidden1: int = 128,
        hidden2: int = 64,
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        scheduler: Literal["none", "onecycle"] = "onecycle",
        warmup: float = 0.3,
        label_smoothing: float = 0.1,
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default",
    ):
        super().__init__()
        if not 0 < min(hidden1, hidden2) <= max(hidden1, hidden2) < 2**31:  # beyond: terabytes of weights
            raise UserError(f"hidden sizes must be 1 to 2^31 - 1, got {hidden1} and {hidden2}")
        if not (lr > 0 and weight_decay >= 0):  # so that NaN fails too
            raise UserError(f"lr must be positive and weight_decay not negative, got {lr} and {weight_decay}")
        if not 0 < warmup < 1:
            raise UserError(f"warmup must be a fraction of the steps, in (0, 1), got {warmup}")
        if not 0 <= label_smoothing < 1:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters()
        self.net = MLP(hidden1, hidden2)
        # nn.CrossEntropyLoss(label_smoothing=label_smoothing), to rounding, in a third of the ops: 7% of a
        # default fit on a CPU. MNIST_LIGHTNING_SPEEDUPS=none makes it call torch's own (speedups.py).
        self.loss = SmoothedCrossEntropy(label_smoothing)
        self.train_metrics, self.val_metrics, self.test_metrics = (LossAndAccuracy() for _ in range(3))
        # Persistent, so that the best so far survives a resume from checkpoint.
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)

    @property
    def example_input_array(self) -> torch.Tensor:
        # For the model summary's shapes and FLOPs, in the weights' dtype: --trainer.precision 64-true or
        # bf16-true has cast them by the time the summary runs.
        return torch.zeros(1, 1, 28, 28, dtype=self.dtype)

    def configure_model(self) -> None:
        # In place, so the state_dict keys (and so the checkpoints) stay those of the plain network.
        if self.hparams.compile:
            self.net.compile(mode=self.hparams.compile_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: LossAndAccuracy):
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        # A metric update per step, logged once an epoch: self.log on every step would cost more than
        # this whole network's step on a CPU. The per-step curve is checks.RunChecks'.
        metrics.update(loss, logits, y)
        return loss, logits

    def training_step(self, batch, batch_idx):
        loss, _ = self._step(batch, self.train_metrics)
        return loss

    def validation_step(self, batch, batch_idx):
        _, logits = self._step(batch, self.val_metrics)
        return logits  # for the temperature (training/calibration.TemperatureScaling)

    def test_step(self, batch, batch_idx):
        _, logits = self._step(batch, self.test_metrics)
        return logits  # for the confusion matrix and the misread digits (report.RunReport)

    def _log_epoch(self, stage: str, metrics: LossAndAccuracy) -> None:
        # compute() sums over the DDP ranks, so every rank logs the same values; sync_dist then only
        # averages equal values. Reset by hand: these are tensors, not the Metric that Lightning resets.
        values = {f"{stage}/{name}": value for name, value in metrics.compute().items()}
        self.log_dict(values, prog_bar=stage != "train", sync_dist=True)
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        # The sanity check's two batches must not count towards the best. Every rank sees the
        # same synchronised val/acc, so every rank tracks the same best.
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(self.val_metrics.compute()["acc"])
            # Not the Metric object: Lightning would reset it after logging.
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)
        self._log_epoch("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics)

    def on_fit_start(self) -> None:
        # --trainer.precision bf16-true or 16-true casts the whole module, and torchmetrics lets .to(dtype)
        # cast the metric states too: a half-precision sum stops counting at 256 (bf16) or 2048 (fp16).
        for metric in (self.train_metrics, self.val_metrics, self.test_metrics, self.val_acc_best):
            metric.set_dtype(torch.float32)

    on_test_start = on_fit_start

    def configure_optimizers(self):
        # fused: one kernel for all six tensors instead of a Python loop over them (~20% of a CPU step).
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True
        )
        if self.hparams.scheduler == "none":
            return optimizer
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=self.hparams.lr,
            total_steps=self.trainer.estimated_stepping_batches,
            pct_start=self.hparams.warmup,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
