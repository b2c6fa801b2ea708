"""Train, validate each epoch, test the best checkpoint: ``python -m mnist_lightning.fit [--help]``."""

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities import rank_zero_info

from mnist_lightning.callbacks import EpochTimer, ProcessGroupTeardown
from mnist_lightning.checkpoint import AtomicCheckpointIO, load_checkpoint
from mnist_lightning.data import MNISTDataModule
from mnist_lightning.errors import UserError, run_main, usage_error
from mnist_lightning.model import MNISTClassifier
from mnist_lightning.runs import ensure_writable, resolve_resume

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"

# The data already sits in memory (or on the GPU): worker processes would only add overhead.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# main() hands over sys.argv less --verbose, which Lightning would flag as args given twice.
warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended to run from within Python.*")
# test(ckpt_path="best") takes the first ModelCheckpoint's best: LightningCLI puts --checkpoint's (val/acc)
# before our last.ckpt one. A ModelCheckpoint in --trainer.callbacks would come first, and be the one used.
warnings.filterwarnings("ignore", ".*configured with multiple `ModelCheckpoint` callbacks.*")
# Lightning 2.6's own pytree helper builds torch's LeafSpec, deprecated in newer torch: nothing to act on here.
warnings.filterwarnings("ignore", r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
# Lightning advertises its cloud logger on every fit; this project logs to TensorBoard.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not str(r.msg).startswith("💡 Tip"))


def config_error(err: Exception) -> UserError:
    """Lightning's verdict on an option, as one line, with a hint where it concerns the hardware."""
    message = " ".join(str(err).split())  # Lightning's messages can span lines
    if re.search(r"accelerator|strateg|backend|\b(devices?|gpus?|cuda|mps|tpus?)\b", message, re.IGNORECASE):
        message += " (check --trainer.accelerator, --trainer.devices, --trainer.strategy)"
    return UserError(message)


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler, which records nothing, minus the cost of its context manager.

    Lightning enters ``profiler.profile(name)`` around every hook call, some 47 times a training step.
    The default's is a new generator-based context manager each time; this one hands back one shared
    no-op context. Any ``--trainer.profiler`` replaces it.
    """

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._nothing


class MNISTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # last.ckpt has a callback of its own, see cli_main
                "checkpoint.filename": "best-epoch{epoch}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="checkpoint to resume from, or 'last' for the newest run's last.ckpt; logs continue in its folder",
        )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self.config.trainer
        # --trainer.enable_checkpointing false must mean no checkpoints at all, ours included.
        if config.enable_checkpointing is False:
            self.parser.callback_keys = [k for k in self.parser.callback_keys if k != "checkpoint"]
            self.trainer_defaults["callbacks"] = [
                c for c in self.trainer_defaults["callbacks"] if not isinstance(c, ModelCheckpoint)
            ]
        theirs = self.config_init.trainer.get("callbacks") or []
        theirs = theirs if isinstance(theirs, list) else [theirs]
        their_bar = any(isinstance(c, ProgressBar) for c in theirs)
        # Unless set, a bar shows on a terminal (the bar draws on stdout), or wherever the user's
        # --trainer.callbacks bring one; elsewhere EpochTimer prints a line per epoch.
        kwargs["enable_progress_bar"] = config.enable_progress_bar
        if kwargs["enable_progress_bar"] is None:
            kwargs["enable_progress_bar"] = sys.stdout.isatty() or their_bar
        if kwargs["enable_progress_bar"] and not their_bar:
            # Lightning's default bar redraws after every step: on a terminal that was 0.3 ms of a
            # 0.8 ms seed.yaml step on a 2-core CPU. Every 20th step still looks live.
            self.trainer_defaults["callbacks"].append(TQDMProgressBar(refresh_rate=20))
        if config.logger in (None, True):  # the default logger, not one the user configured
            root = Path(config.default_root_dir or ".").resolve() / "lightning_logs"
            self.config.ckpt_path, version = resolve_resume(root, self.config.ckpt_path)
            kwargs["logger"] = TensorBoardLogger(root.parent, version=version, default_hp_metric=False)
            self.claimed = root / f"version_{version}" if version is not None else None
        if config.plugins is None:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if config.profiler is None:
            kwargs["profiler"] = NoProfiler()
        try:
            return super().instantiate_trainer(**kwargs)
        except BaseException as err:
            # A Trainer that cannot be built (no GPU, say) must not leave an empty run folder.
            claimed = getattr(self, "claimed", None)
            if claimed and claimed.is_dir() and not any(claimed.iterdir()):
                claimed.rmdir()
            if isinstance(err, MisconfigurationException | ValueError | TypeError):  # no GPU, a bad strategy
                raise config_error(err) from err
            raise


def cli_main(args: list[str] | None = None) -> dict:
    """Parse the command line, train, test the best checkpoint; returns what ``metrics.json`` holds."""
    if not torch.cuda.is_available():
        # Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that asking whether CUDA exists never
        # initialises it (a forked DDP worker could not use it then). torch's optimizers ask on every
        # step, and with no NVIDIA driver each NVML probe loads the library again: 31 us a call. With
        # no GPU there is nothing to initialise, and the plain check answers in under a microsecond.
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    # last.ckpt after every epoch, for resuming: save_last=True on the val/acc checkpoint would only
    # refresh it in the epochs that improve val/acc.
    last = ModelCheckpoint(filename="last", enable_version_counter=False)
    timer = EpochTimer()
    default_config = [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else []
    try:
        cli = MNISTCLI(
            MNISTClassifier,
            MNISTDataModule,
            args=args,
            run=False,
            seed_everything_default=42,
            # enable_progress_bar None: decided in instantiate_trainer, once the callbacks are known.
            trainer_defaults={"enable_progress_bar": None, "callbacks": [timer, last, ProcessGroupTeardown()]},
            # Raise instead of printing the whole usage, so that a mistake reads as one line.
            parser_kwargs={"default_config_files": default_config, "exit_on_error": False},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the model's own configure_optimizers is the one
        )
    except ArgumentError as err:
        raise usage_error(err) from None
    except MisconfigurationException as err:  # from a callback's constructor: --checkpoint.mode, say
        raise config_error(err) from err
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if trainer.logger:
        # Fix the version folder here, or under ddp_spawn the fit's and the test's spawned
        # processes would each pick a new one (a configured logger may not have one yet).
        trainer.logger.version  # noqa: B018
    start = time.perf_counter()
    try:
        for callback in trainer.checkpoint_callbacks:
            if callback.dirpath and trainer.is_global_zero:  # a folder of the user's; the run folder is checked
                ensure_writable(Path(callback.dirpath), "--checkpoint.dirpath")
        if cli.config.ckpt_path:
            # Refuse a corrupt, hostile or mismatched checkpoint in one line, before Lightning loads it.
            load_checkpoint(cli.config.ckpt_path, model=copy.deepcopy(model))
            rank_zero_info(
                f"Resuming from {cli.config.ckpt_path}. Checkpoints are written at the end of each epoch, so "
                "training restarts at the start of the epoch after it; work done after it is redone."
            )
        # weights_only: a checkpoint never runs code when it is loaded, here or for the test below.
        trainer.fit(model, datamodule=data, ckpt_path=cli.config.ckpt_path, weights_only=True)
    except UserError:
        # A run that failed before its first checkpoint (bad data, say) leaves no empty folder behind.
        run_dir = Path(trainer.logger.log_dir) if trainer.logger and trainer.is_global_zero else None
        if run_dir and run_dir.is_dir() and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir)
        raise
    fit_seconds = time.perf_counter() - start
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    ckpt_path = "best" if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path else None
    test_metrics = trainer.test(model, datamodule=data, ckpt_path=ckpt_path, verbose=False, weights_only=True)[0]
    result = {
        **fit_metrics,
        **test_metrics,
        "best_model_path": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None,
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
            try:
                Path(log_dir, "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
            except OSError as err:
                raise UserError(
                    f"could not write {log_dir}/metrics.json ({err.strerror}); the checkpoints are kept"
                ) from None
        print(
            f"test/acc {result['test/acc']:.4f}  test/loss {result['test/loss']:.4f}  ({ckpt_path or 'final'} weights)"
        )
    return result


def main() -> None:
    run_main(cli_main)


if __name__ == "__main__":
    main()
