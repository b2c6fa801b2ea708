"""The network (a plain MLP) and the LightningModule that trains it."""

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_lightning import report
from mnist_lightning.errors import UserError
from mnist_lightning.metrics import LossAndAccuracy


class MLP(nn.Sequential):
    """The classic 784-128-64-10 multilayer perceptron with ReLU."""

    def __init__(self, hidden1: int = 128, hidden2: int = 64):
        super().__init__(
            nn.Flatten(),
            nn.Linear(28 * 28, hidden1),
            nn.ReLU(),
            nn.Linear(hidden1, hidden2),
            nn.ReLU(),
            nn.Linear(hidden2, 10),
        )


class SmoothedCrossEntropy(nn.Module):
    """``nn.CrossEntropyLoss(label_smoothing=smoothing)`` as one dot product of weights and log-probabilities.

    The same loss and gradients in fewer ops, so fewer kernel launches on a GPU: 4 compute ops forward
    and 2 backward, against 7 and 4 for soft targets through ``cross_entropy``, and more for torch's own
    label-smoothing path (which also masks ``ignore_index``, which this does not support).
    """

    def __init__(self, smoothing: float, classes: int = 10):
        super().__init__()
        self.smoothing, self.classes = smoothing, classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The mean over the batch of -sum(soft target * log p): the soft targets, negated and divided by
        # the batch size, are the weights. Built from the logits, not kept as a buffer, which DDP would
        # broadcast every step; in float32 at least, so that bf16 logits do not round them.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        spread = self.smoothing / self.classes  # to every class; the true one gets 1 - smoothing more
        scale = -1 / max(len(target), 1)  # an empty batch has loss 0
        weights = torch.full_like(logits, spread * scale, dtype=dtype)
        weights.scatter_(1, target.unsqueeze(1), (1 - self.smoothing + spread) * scale)
        return torch.dot(weights.flatten(), logits.log_softmax(1, dtype=dtype).flatten())


class MNISTClassifier(L.LightningModule):
    """MLP + cross-entropy + Adam, with loss and accuracy per epoch through torchmetrics.

    Args:
        hidden1: width of the first hidden layer.
        hidden2: width of the second hidden layer.
        lr: Adam's learning rate; the peak rate when ``scheduler`` is ``onecycle``.
        weight_decay: Adam's (L2) weight decay.
        scheduler: ``none`` keeps ``lr`` fixed; ``onecycle`` warms up to it and anneals, stepping per batch.
        label_smoothing: weight moved from the true class onto all ten, in the cross-entropy target.
        compile: run the network through ``torch.compile`` (the first steps compile).
        compile_mode: torch.compile's mode, with ``compile``; ``reduce-overhead`` also replays the network's
            forward and backward as CUDA graphs, for a GPU that spends the step launching kernels.
    """

    def __init__(
        self,
        hidden1: int = 128,
        hidden2: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: Literal["none", "onecycle"] = "none",
        label_smoothing: float = 0.0,
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default",
    ):
        super().__init__()
        if min(hidden1, hidden2) <= 0:
            raise UserError(f"hidden sizes must be positive, got {hidden1} and {hidden2}")
        if lr <= 0 or weight_decay < 0:
            raise UserError(f"lr must be positive and weight_decay not negative, got {lr} and {weight_decay}")
        if not 0 <= label_smoothing < 1:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters()
        self.net = MLP(hidden1, hidden2)
        self.loss = SmoothedCrossEntropy(label_smoothing) if label_smoothing else nn.CrossEntropyLoss()
        self.train_metrics, self.val_metrics, self.test_metrics = (LossAndAccuracy() for _ in range(3))
        # Test only: where the mistakes are, for the TensorBoard pictures (see report.py).
        # validate_args=False: the argument checks would sync with the device on every update.
        self.test_confusion = MulticlassConfusionMatrix(10, validate_args=False)
        self.mistakes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # Persistent, so that the best so far survives a resume from checkpoint.
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets _current_fx_name around every hook it calls, some 40 times a training step, and
        # nn.Module.__setattr__ checks parameters, buffers and submodules each time: 50 us a step on a
        # 2-core CPU, 5% of it at batch 64. A plain string attribute needs none of those checks.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def configure_model(self) -> None:
        # In place, so the state_dict keys (and so the checkpoints) stay those of the plain network.
        if self.hparams.compile:
            self.net.compile(mode=self.hparams.compile_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        # Only a metric update per step: self.log costs far more than this whole MLP's step on a CPU.
        getattr(self, f"{stage}_metrics").update(loss, logits, y)
        return loss, logits

    def _log_epoch(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        # compute() sums over the DDP ranks, so every rank logs the same values; sync_dist then only
        # averages equal values. Reset by hand: these are tensors, not the Metric that Lightning resets.
        values = {f"{stage}/{name}": value for name, value in metrics.compute().items()}
        self.log_dict(values, prog_bar=stage != "train", sync_dist=True)
        metrics.reset()

    def training_step(self, batch, batch_idx):
        loss, _ = self._step(batch, "train")
        # The per-step curve, on the steps where Lightning writes to the logger anyway, and the
        # finiteness check there too: on a GPU it waits for the device, so not on every step.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False)
            self._check_finite(loss.detach(), f"at step {self.global_step}")
        return loss

    def _check_finite(self, loss: torch.Tensor, where: str) -> None:
        # Raised before the epoch's checkpoint is written, so the last good checkpoint survives.
        if not torch.isfinite(loss):
            advice = "Lower --model.lr or check the input data"
            if self.trainer.precision == "16-true":
                # Adam's eps (1e-8) is 0 in float16, so a weight whose gradients are all 0 gets 0 / 0.
                advice = "Adam does not train in float16 (its eps, 1e-8, rounds to 0); use --trainer.precision 16-mixed"
            raise UserError(
                f"train/loss is {float(loss)} {where} (epoch {self.current_epoch}); training stopped and the "
                f"last good checkpoint kept. {advice}"
            )

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        _, logits = self._step(batch, "test")
        x, y = batch
        predicted = logits.argmax(1)
        self.test_confusion.update(predicted, y)
        if sum(len(t) for _, t, _ in self.mistakes) < report.MISTAKES_SHOWN:
            wrong = predicted != y
            self.mistakes.append((x[wrong], y[wrong], predicted[wrong]))

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        matrix = self.test_confusion.compute()  # summed over DDP ranks
        for digit, accuracy in enumerate(matrix.diag() / matrix.sum(1).clamp(min=1)):
            self.log(f"test/acc_digit_{digit}", accuracy, sync_dist=True)  # equal on every rank already
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            report.log_test_pictures(self.logger.experiment, matrix, self.mistakes, self.global_step)
        self.test_confusion.reset()
        self.mistakes.clear()

    def on_fit_start(self) -> None:
        # --trainer.precision bf16-true or 16-true casts the whole module, and torchmetrics lets .to(dtype)
        # cast the metric states too: a half-precision sum stops counting at 256 (bf16) or 2048 (fp16).
        for metric in (self.train_metrics, self.val_metrics, self.test_metrics, self.val_acc_best):
            metric.set_dtype(torch.float32)

    on_test_start = on_fit_start

    def on_train_start(self) -> None:
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            data = self.trainer.datamodule.hparams if self.trainer.datamodule else {}
            params = {
                f"{group}/{k}": v
                for group, hp in (("model", self.hparams), ("data", data))
                for k, v in hp.items()
                if not k.startswith("_")  # LightningCLI's bookkeeping, not a hyperparameter
            }
            report.log_hparams(self.logger, params, ["val/acc_best", "test/acc"])
        # A resumed one-cycle schedule keeps its original length; running past it would crash mid-run.
        for config in self.trainer.lr_scheduler_configs:
            total, needed = (
                getattr(config.scheduler, "total_steps", None),
                self.trainer.estimated_stepping_batches,
            )
            if total is not None and total < needed:
                raise UserError(
                    f"the checkpoint's one-cycle schedule ends after {total} steps but this run needs {needed}; "
                    "resume with the max_epochs it was started with, or use --model.scheduler none"
                )

    def on_validation_epoch_end(self) -> None:
        # The sanity check's two batches must not count towards the best. Every rank sees the
        # same synchronised val/acc, so every rank tracks the same best.
        if not self.trainer.sanity_checking:
            self._check_finite(self.train_metrics.compute()["loss"], "in the epoch's mean")
            self.val_acc_best.update(self.val_metrics.compute()["acc"])
            # Not the Metric object: Lightning would reset it after logging.
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)
        self._log_epoch("val")

    def configure_optimizers(self):
        # fused: one kernel for all six tensors instead of a Python loop over them (~20% of a CPU step).
        optimizer = torch.optim.Adam(
            self.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            fused=True,
        )
        if self.hparams.scheduler == "none":
            return optimizer
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
