"""Train, validate each epoch, test the best checkpoint: ``python -m mnist_lightning.fit [--help]``."""

import errno
import json
import logging
import sys
import threading
import time
import warnings
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnist_lightning.data import MNISTDataModule
from mnist_lightning.errors import UserError, config_error, run_main, usage_error
from mnist_lightning.files import runs
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.outputs import disk_error
from mnist_lightning.model import MNISTClassifier
from mnist_lightning.training import speedups
from mnist_lightning.training.callbacks import EpochTimer, ProcessGroupTeardown, closing_lines
from mnist_lightning.training.checks import RunChecks
from mnist_lightning.training.tensorboard import RunReport
from mnist_lightning.training.trainer import MNISTCLI


def cli_main(args: list[str] | None = None, callbacks: tuple[Callback, ...] = ()) -> dict:
    """Parse the command line, train, test the best checkpoint; returns what ``metrics.json`` holds.

    ``callbacks`` join every fit's own: the seam tests and benchmarks use to watch a run.
    """
    speedups.configure()
    speedups.skip_nvml_probe()
    timer, checks = EpochTimer(), RunChecks()
    ours = [timer, checks, RunReport(), ProcessGroupTeardown()]
    try:
        cli = MNISTCLI(
            MNISTClassifier,
            MNISTDataModule,
            args=list(sys.argv[1:] if args is None else args),
            run=False,
            seed_everything_default=42,
            # enable_progress_bar None: decided in instantiate_trainer, once the callbacks are known.
            trainer_defaults={"max_epochs": 5, "enable_progress_bar": None, "callbacks": [*ours, *callbacks]},
            # Raise instead of printing the whole usage, so that a mistake reads as one line.
            parser_kwargs={"exit_on_error": False},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the model's own configure_optimizers is the one
        )
    except ArgumentError as err:
        raise usage_error(err) from None
    except MisconfigurationException as err:  # from a callback's constructor: --checkpoint.mode, say
        raise config_error(err) from err
    trainer, model, data, ckpt_path = cli.trainer, cli.model, cli.datamodule, cli.config.ckpt_path
    if trainer.logger:
        # Fix the version folder here, or under ddp_spawn the fit's and the test's spawned
        # processes would each pick a new one (a configured logger may not have one yet).
        trainer.logger.version  # noqa: B018
    start = time.perf_counter()
    try:
        for callback in trainer.checkpoint_callbacks:
            if callback.dirpath and trainer.is_global_zero:  # a folder of the user's; the run folder is checked
                runs.ensure_writable(Path(callback.dirpath), "--checkpoint.dirpath")
        if ckpt_path:
            load_checkpoint(ckpt_path, like=model.net)  # a corrupt, hostile or mismatched one: one line
            checks.ckpt_path = ckpt_path
            rank_zero_info(
                f"Resuming from {ckpt_path}. Checkpoints are written at the end of each epoch, so training "
                "restarts at the start of the epoch after it; work done after it is redone."
            )
        # weights_only: a checkpoint never runs code when it is loaded, here or for the test below.
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        fit_seconds = time.perf_counter() - start
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        # A resume of a run stopped in its final test trains nothing: its figures come from the checkpoint.
        fit_metrics = {**timer.metrics, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
        best_or_final = "best" if best else None
        tested = trainer.test(model, datamodule=data, ckpt_path=best_or_final, verbose=False, weights_only=True)
    except BaseException as err:
        if cli.claimed and trainer.global_step == 0:  # it failed before training: nothing to keep
            runs.release(cli.claimed)
        if isinstance(err, SIGTERMException):  # a SystemExit with status 0: a requeue script would see success
            raise UserError(
                f"stopped by SIGTERM in epoch {trainer.current_epoch + 1} of {trainer.max_epochs}; the epochs "
                "before it are in last.ckpt: resume with --ckpt_path last"
            ) from None
        cause = disk_error(err)
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            # TensorBoard's events are written by a thread, and name no file: name the run instead.
            where = cause.filename or (trainer.logger.log_dir if trainer.logger else trainer.default_root_dir)
            raise UserError(
                f"the disk is full ({cause.strerror}) writing {where}; the run stopped, and its checkpoints and "
                "logs so far are kept. Free some space, then resume with --ckpt_path last"
            ) from None
        raise
    test_metrics = tested[0] if tested else {}  # none with --trainer.limit_test_batches 0
    result = {
        **fit_metrics,
        **test_metrics,
        "best_model_path": best or None,
        "fit_seconds": fit_seconds,
        "epoch_seconds": timer.seconds,
        "global_step": trainer.global_step,
        # Under ddp_spawn the data lived in the spawned processes only.
        "train_samples": len(data.train_set) if hasattr(data, "train_set") else None,
        "config": json.loads(cli.parser.dump(cli.config, format="json", skip_check=True)),
    }
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    if trainer.is_global_zero:
        if log_dir:
            runs.write_metrics(Path(log_dir), result)
        tensorboard = isinstance(trainer.logger, TensorBoardLogger)
        print(closing_lines(result, Path(log_dir) if log_dir else None, model.hparams.label_smoothing, tensorboard))
    return result


def quiet_event_writer(hook):
    def excepthook(args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            hook(args)

    return excepthook


def quiet_lightning() -> None:
    """Leave out Lightning's messages that say nothing a user of fit (or of a sweep's fits) can act on."""
    # cli_main hands LightningCLI sys.argv as its args, which Lightning would flag as args given twice.
    warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended to run from within Python.*")
    # The data already sits in memory (or on the GPU): worker processes would only add overhead.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # test(ckpt_path="best") takes the first ModelCheckpoint's best, ours unless --trainer.callbacks adds one.
    warnings.filterwarnings("ignore", ".*configured with multiple `ModelCheckpoint` callbacks.*")
    # Lightning 2.6's own pytree helper builds torch's LeafSpec, deprecated in newer torch.
    warnings.filterwarnings("ignore", r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # Resuming continues in the run's own checkpoint folder, which Lightning warns is not empty.
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
    # TensorBoard's writer thread prints its own traceback of a full disk, which the next write raises here.
    threading.excepthook = quiet_event_writer(threading.excepthook)
    # A warning is one line, without the path of the library file that raised it.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    # Lightning advertises its cloud logger on every fit, says that max_epochs was reached just before
    # the last epoch's line says so, and names the tested checkpoint twice.
    noise = ("💡 Tip", "`Trainer.fit` stopped: `max_epochs=", "Loaded model weights from the checkpoint at")
    noise += ("Loading `train_dataloader` to estimate number of stepping batches",)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not str(r.msg).startswith(noise))


def main() -> None:
    quiet_lightning()
    try:
        run_main(cli_main)
    finally:
        speedups.exit_without_gc()


if __name__ == "__main__":
    main()
