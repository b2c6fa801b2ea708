"""Where fit's Trainer is built, and with what.

LightningCLI reads fit's options from the signatures of the model, the data and ``L.Trainer``; this
adds the best and last checkpoints, the run folder and its lock, the callbacks every fit has
(epoch lines, checks, the temperature, TensorBoard's report, SLURM's requeue), the speedups, and resuming a run as
it was configured, after ``--ckpt_path last`` or a SLURM requeue.
"""

import re
import sys
import traceback
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from mnist_lightning.cli import prog, safe_yaml, usage_error
from mnist_lightning.errors import UserError
from mnist_lightning.files import runs
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.lock import lock
from mnist_lightning.training import slurm, speedups
from mnist_lightning.training.calibration import TemperatureScaling
from mnist_lightning.training.callbacks import EpochBar, EpochCheckpoint, EpochTimer, ProcessGroupTeardown
from mnist_lightning.training.checks import RunChecks, check_options
from mnist_lightning.training.tensorboard import RunLogger, RunReport

# fit's defaults beyond the signatures' (the sweep parses with them too). The tutorial's five epochs;
# enable_progress_bar None: decided in instantiate_trainer; the model's own configure_optimizers is the one.
DEFAULTS = {
    "seed_everything_default": 42,
    "trainer_defaults": {"max_epochs": 5, "enable_progress_bar": None},
    "auto_configure_optimizers": False,
}


def build(model_class: type, datamodule_class: type, args: list[str], callbacks: tuple[Callback, ...] = ()):
    """Parse fit's command line into the model, the data and the Trainer, ready for ``trainer.fit``.

    ``callbacks`` join every fit's own: the seam tests, benchmarks and the sweep use to watch a run.
    """
    speedups.configure()
    speedups.skip_nvml_probe()
    timer, checks = EpochTimer(), RunChecks()
    ours = [timer, checks, TemperatureScaling(), RunReport(), ProcessGroupTeardown(), slurm.SlurmRequeue()]
    try:
        cli = MNISTCLI(
            model_class,
            datamodule_class,
            args=args,
            run=False,
            **{**DEFAULTS, "trainer_defaults": {**DEFAULTS["trainer_defaults"], "callbacks": [*ours, *callbacks]}},
            # Raise instead of printing the whole usage, so that a mistake reads as one line.
            parser_kwargs={"exit_on_error": False, "prog": prog("fit")},
            save_config_kwargs={"overwrite": True},
        )
    except ArgumentError as err:
        raise usage_error(err) from None
    except MisconfigurationException as err:  # from a callback's constructor: --checkpoint.mode, say
        raise config_error(err) from err
    cli.timer = timer
    trainer, ckpt_path = cli.trainer, cli.config.ckpt_path
    if trainer.logger:
        # Fix the version folder here, or under ddp_spawn the fit's and the test's spawned
        # processes would each pick a new one (a configured logger may not have one yet).
        trainer.logger.version  # noqa: B018
    with runs.released_on_failure(cli.claimed):
        for callback in trainer.checkpoint_callbacks:
            if callback.dirpath and trainer.is_global_zero:  # a folder of the user's; the run folder is checked
                runs.ensure_writable(Path(callback.dirpath), "--checkpoint.dirpath")
        if ckpt_path:
            load_checkpoint(ckpt_path, like=cli.model.net, quiet=True)  # a corrupt, hostile or mismatched one: one line
            checks.ckpt_path = ckpt_path
            rank_zero_info(
                f"Resuming from {ckpt_path}. Checkpoints are written at the end of each epoch, so training "
                "restarts at the start of the epoch after it; work done after it is redone."
            )
    return cli


class MNISTCLI(LightningCLI):
    def init_parser(self, **kwargs) -> LightningArgumentParser:
        safe_yaml()
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Not add_lightning_class_args: these checkpoints are left out with --trainer.enable_checkpointing false.
        parser.add_class_arguments(EpochCheckpoint, "checkpoint", fail_untyped=False, sub_configs=True)
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # last.ckpt has a callback of its own, below
                "checkpoint.filename": "best-epoch{epoch}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="checkpoint to resume from, or 'last' for the newest run's last.ckpt; "
            "the run continues in its folder, with its config.yaml under the options given",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        check_options(self.config)
        seed = self.config.seed_everything
        if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:
            # numpy's bound, which Lightning would raise a traceback about
            raise UserError(f"--seed_everything {seed} is out of range: use 0 to {2**32 - 1}, or true for a random one")
        if self.config.trainer.default_root_dir:  # before anything looks for runs in it
            runs.resolved_folder(Path(self.config.trainer.default_root_dir), "--trainer.default_root_dir")
        ckpt_path = self.config.ckpt_path
        if ckpt_path is not None and not ckpt_path.strip():
            raise UserError("--ckpt_path is empty: pass a checkpoint or 'last', or leave it out to start a new run")
        root, logger = Path(self.config.trainer.default_root_dir or "."), self.config.trainer.logger
        if ckpt_path in ("last", "best"):
            ckpt_path = str(runs.resume_last(root, logger, ckpt_path))
        elif ckpt_path is None and (job := slurm.job_id()):
            slurm.refuse_lightnings_checkpoint(root)
            if logger in (None, True):
                ckpt_path = slurm.requeued_checkpoint(root / "lightning_logs", job)  # None on the job's first start
        saved = runs.saved_config(ckpt_path) if ckpt_path else None
        if saved:  # a resume continues the run as it was configured, the options given on top
            super().parse_arguments(parser, ["--config", str(saved), *args, "--ckpt_path", ckpt_path])
            check_options(self.config)  # a config.yaml edited by hand
        self.config.ckpt_path = ckpt_path

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except RuntimeError as err:  # torch's allocators raise RuntimeError (or its OutOfMemoryError)
            if "allocate" not in str(err):
                raise
            hidden1, hidden2 = self.config.model.hidden1, self.config.model.hidden2
            size = 4 * ((28 * 28 + 1) * hidden1 + (hidden1 + 1) * hidden2 + (hidden2 + 1) * 10)
            raise UserError(
                f"a 784-{hidden1}-{hidden2}-10 network needs {size / 2**30:.1f} GiB for its float32 weights alone, "
                "more than can be allocated; pick smaller --model.hidden1 and --model.hidden2"
            ) from None

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config, theirs = self.config.trainer, self.config_init.trainer.get("callbacks") or []
        theirs = theirs if isinstance(theirs, list) else [theirs]
        their_bar = any(isinstance(c, ProgressBar) for c in theirs)
        # Unless set, a bar shows on a terminal (the bar draws on stdout), or wherever the user's
        # --trainer.callbacks bring one; elsewhere EpochTimer prints a line per epoch.
        show_bar = config.enable_progress_bar
        show_bar = sys.stdout.isatty() or their_bar if show_bar is None else show_bar
        ours = []
        if config.enable_checkpointing is not False:
            # last.ckpt after every epoch, for resuming: save_last=True on the val/acc checkpoint would
            # only refresh it in the epochs that improve val/acc.
            ours = [self.config_init.checkpoint, ModelCheckpoint(filename="last", enable_version_counter=False)]
        if show_bar and not their_bar:
            ours.append(EpochBar(refresh_rate=speedups.bar_refresh_rate()))
        if config.logger is not False:  # the learning-rate curve, on the steps Lightning logs on
            ours.append(LearningRateMonitor(logging_interval="step"))
        kwargs.update(speedups.trainer_kwargs(config.profiler), callbacks=theirs + ours, enable_progress_bar=show_bar)
        self.claimed = None
        if config.logger in (None, True):  # the default logger, not one the user configured
            root = runs.resolved_folder(Path(config.default_root_dir or "."), "--trainer.default_root_dir")
            root = root / "lightning_logs"
            version, created = runs.version_for(root, self.config.ckpt_path)
            kwargs["logger"] = RunLogger(root.parent, version=version, default_hp_metric=False)
            self.claimed = root / f"version_{version}" if created else None
            if version is not None and not rank_zero_only.rank:  # the other ranks log into rank zero's folder
                try:
                    lock(root / f"version_{version}")
                    if job := slurm.job_id():
                        slurm.record(root / f"version_{version}", job)
                except UserError:
                    if self.claimed:
                        runs.release(self.claimed)
                    raise
        if config.plugins is None:
            kwargs["plugins"] = [runs.AtomicCheckpointIO(), *slurm.plugins()]
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError, ModuleNotFoundError) as err:
            if self.claimed:
                runs.release(self.claimed)
            # A missing package is the requirement of an option chosen (--trainer.precision transformer-engine).
            if isinstance(err, MisconfigurationException | ModuleNotFoundError) or checks_an_argument(err):
                raise config_error(err) from err
            raise


def checks_an_argument(err: Exception) -> bool:
    """Whether Lightning raised it while checking the Trainer's arguments (a strategy or precision name, ...)."""
    where = traceback.extract_tb(err.__traceback__)[-1].filename.replace("\\", "/")
    return "lightning/pytorch/trainer/connectors/" in where or where.endswith("lightning/fabric/connector.py")


def config_error(err: Exception) -> UserError:
    """Lightning's verdict on an option, as one line, with a hint where it concerns the hardware."""
    message = " ".join(str(err).split())  # Lightning's messages can span lines
    if re.search(r"accelerator|strateg|backend|\b(devices?|gpus?|cuda|mps|tpus?)\b", message, re.IGNORECASE):
        message += " (check --trainer.accelerator, --trainer.devices, --trainer.strategy)"
    return UserError(message)
