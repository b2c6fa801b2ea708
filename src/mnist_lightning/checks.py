"""Checks that stop a fit with one clear line instead of training on into nonsense or a crash."""

from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from mnist_lightning.errors import UserError


class RunChecks(Callback):
    """Logs the per-step training loss and stops on a non-finite one, on the steps Lightning logs on;
    refuses a resumed one-cycle schedule that would run out before the run ends.

    The loss is checked only on logging steps: on a GPU each check waits for the device. The epoch's mean
    loss is checked too, at validation, before that epoch's checkpoint is written, so the last
    checkpoint is a good one. One callback for both, as Lightning calls every callback at every hook.
    """

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        # A resumed one-cycle schedule keeps its original length; running past it would crash mid-run.
        for config in trainer.lr_scheduler_configs:
            total, needed = getattr(config.scheduler, "total_steps", None), trainer.estimated_stepping_batches
            if total is not None and total < needed:
                raise UserError(
                    f"the checkpoint's one-cycle schedule ends after {total} steps but this run needs {needed}; "
                    "a one-cycle schedule cannot be extended: resume with the max_epochs it was started with, "
                    "or start a new run with more epochs"
                )

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = trainer.log_every_n_steps  # 0: no per-step logging, and so no per-step check
        if every and trainer.global_step % every == 0:
            loss = outputs["loss"].detach()
            pl_module.log("train/loss_step", loss, on_step=True, on_epoch=False)
            self._check(trainer, loss, f"at step {trainer.global_step - 1}")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, pl_module.train_metrics.compute()["loss"], "in the epoch's mean")

    def _check(self, trainer: Trainer, loss: torch.Tensor, where: str) -> None:
        if torch.isfinite(loss):
            return
        advice = "Lower --model.lr or check the input data"
        if trainer.precision == "16-true":
            # Adam's eps (1e-8) is 0 in float16, so a weight whose gradients are all 0 gets 0 / 0.
            advice = "Adam does not train in float16 (its eps, 1e-8, rounds to 0); use --trainer.precision 16-mixed"
        saved = [Path(c.last_model_path or c.best_model_path) for c in trainer.checkpoint_callbacks]
        saved = [p for p in saved if p.name and p.is_file()]
        kept = f"the last good checkpoint, {saved[-1]}, is kept" if saved else "no checkpoint had been written yet"
        raise UserError(
            f"train/loss is {float(loss)} {where} (epoch {trainer.current_epoch + 1} of {trainer.max_epochs}); "
            f"training stopped and {kept}. "
            f"{advice}"
        )
