"""Checks that stop a fit with one clear line instead of training on into nonsense or a crash."""

import math
import os
import re
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from mnist_lightning.errors import UserError

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class RunChecks(Callback):
    """Logs the per-step training loss and stops on a non-finite one, on the steps Lightning logs on;
    before anything is written, refuses a network too big for the memory, a one-cycle schedule with no
    finite length or (resumed) another length, and a resume of a run that has finished.

    The loss is checked only on logging steps: on a GPU each check waits for the device. The epoch's mean
    loss is checked too, at validation, before that epoch's checkpoint is written, so the last
    checkpoint is a good one. One callback for both, as Lightning calls every callback at every hook.
    """

    def __init__(self):
        self.ckpt_path = None  # set by fit before trainer.fit: Lightning reads the checkpoint only after setup

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        # Before SaveConfigCallback (a later callback) rewrites config.yaml and before the first event is
        # logged, so that a refused run leaves its folder as it was.
        if stage != "fit":
            return
        if trainer.precision == "16-true":
            # Adam's eps (1e-8) is 0 in float16, so a weight whose gradients are all 0 gets 0 / 0: NaN.
            raise UserError(
                "--trainer.precision 16-true: Adam does not train float16 weights (its eps, 1e-8, rounds to 0 and "
                "the weights turn NaN within an epoch); use 16-mixed, or bf16-true"
            )
        check_memory(trainer, pl_module)
        checkpoint = torch.load(self.ckpt_path, map_location="cpu", weights_only=True) if self.ckpt_path else {}
        if checkpoint:
            check_not_finished(trainer, checkpoint, Path(self.ckpt_path))
        if pl_module.hparams.get("scheduler") == "onecycle":
            check_one_cycle(trainer, pl_module, checkpoint)

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
        saved = [Path(c.last_model_path or c.best_model_path) for c in trainer.checkpoint_callbacks]
        saved = [p for p in saved if p.name and p.is_file()]
        kept = f"the last good checkpoint, {saved[-1]}, is kept" if saved else "no checkpoint had been written yet"
        raise UserError(
            f"train/loss is {float(loss)} {where} (epoch {trainer.current_epoch + 1} of {trainer.max_epochs}); "
            f"training stopped and {kept}. "
            f"{advice}"
        )


def check_memory(trainer: Trainer, pl_module) -> None:
    """Training holds four float32 copies of the weights: them, their gradients and Adam's two moments."""
    weights = sum(p.numel() for p in pl_module.parameters())
    needed, device = 4 * weights * 4, trainer.strategy.root_device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        free = available_memory()
    else:
        return
    if free is None:
        return
    if needed > free:
        hp = pl_module.hparams
        raise UserError(
            f"--model.hidden1 {hp.hidden1} and --model.hidden2 {hp.hidden2} make {weights:,} weights: training "
            f"needs about {needed / 2**30:.1f} GiB (the weights, their gradients and Adam's two moments, in "
            f"float32) but the {device.type} has {free / 2**30:.1f} GiB available; pick smaller hidden sizes"
        )


def available_memory() -> int | None:
    """Linux's MemAvailable (free memory plus the page cache it can drop), else the free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf"):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_not_finished(trainer: Trainer, checkpoint: dict, ckpt_path: Path) -> None:
    """Resuming a finished run would only test it again, and replace its metrics.json."""
    run = ckpt_path.parent.parent
    epochs = checkpoint.get("epoch", -1) + 1
    if (run / "metrics.json").is_file() and trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs:
        if checkpoint.get("hyper_parameters", {}).get("scheduler") == "none":
            further = "to train it further pass a larger --trainer.max_epochs"
        else:
            further = "its one-cycle schedule cannot be extended: start a new run with a larger --trainer.max_epochs"
        raise UserError(
            f"{run} has finished its {epochs} epochs (it has a metrics.json), so resuming it would train nothing; "
            f"to test it run python -m mnist_lightning.evaluate --ckpt_path {ckpt_path}; {further}"
        )


def check_one_cycle(trainer: Trainer, pl_module, checkpoint: dict) -> None:
    """OneCycleLR needs the run's step count up front, and a resumed schedule keeps its original one."""
    needed = trainer.estimated_stepping_batches
    if not (0 < needed < math.inf):
        why = "trains forever" if needed == math.inf else "trains no step"
        raise UserError(
            f"the one-cycle schedule needs a fixed, positive number of steps, but this run {why} (see "
            "--trainer.max_epochs, --trainer.max_steps and --trainer.limit_train_batches); set them, "
            "or use --model.scheduler none"
        )
    total = next((s.get("total_steps") for s in checkpoint.get("lr_schedulers", ())), None)
    if total is None or total == needed:
        return
    old = checkpoint.get("datamodule_hyper_parameters", {}).get("batch_size")
    new = trainer.datamodule.hparams.batch_size if trainer.datamodule else old
    cause = f"its --data.batch_size was {old}, not {new}" if old != new else "its --trainer.max_epochs differs"
    raise UserError(
        f"the checkpoint's one-cycle schedule ends after {total} steps but this run needs {needed} "
        f"({cause}); a one-cycle schedule cannot be stretched: resume with the options it was started with, "
        "or start a new run"
    )


def check_options(config) -> None:
    """What no signature says, for every option at once, before anything is created: a float is finite
    (a NaN passes any range check, ``lr <= 0`` included), and a folder or path is local.

    Lightning and fsspec would take a URL such as ``s3://b/runs`` for a folder, but fit's run folders,
    locks and checkpoint writes are local files: ``memory://runs`` would make a folder named ``memory:``.
    """
    for key, value in _leaves(config, ""):
        option = "--" + key.replace(".init_args.", ".")  # jsonargparse takes --trainer.logger.save_dir
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{option} is {value}: it must be a finite number")
        name = key.rsplit(".", 1)[-1]
        if isinstance(value, str) and name.endswith(("dir", "dirpath", "path")) and URL.match(value):
            raise UserError(
                f"{option} {value}: fit reads and writes local folders only, not URLs; pass a folder "
                "(a bucket mounted as one works)"
            )


def _leaves(value, key: str):
    """(dotted key, value) for each option in a parsed config, into lists of classes (--trainer.callbacks)."""
    if hasattr(value, "items") and not isinstance(value, str):
        for name, inner in value.items():
            yield from _leaves(inner, f"{key}.{name}" if key else name)
    elif isinstance(value, list | tuple):
        for index, inner in enumerate(value):
            yield from _leaves(inner, f"{key}[{index}]")
    else:
        yield key, value
