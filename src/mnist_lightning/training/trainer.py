"""The command line of fit: LightningCLI, plus the checkpoint options, resuming and the run's Trainer."""

import sys
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from mnist_lightning.errors import UserError, checks_an_argument, config_error
from mnist_lightning.files import runs
from mnist_lightning.training import speedups
from mnist_lightning.training.callbacks import EpochBar, EpochCheckpoint
from mnist_lightning.training.tensorboard import RunLogger


def refuse_aliases(load):
    """Wrap jsonargparse's YAML loader so that a YAML alias is refused before anything is expanded: nested
    aliases (a "billion laughs" file of a few hundred bytes) would grow the config until the process dies.
    A config for this CLI never needs one."""

    def load_without_aliases(stream, *args, **kwargs):
        import yaml

        if isinstance(stream, str) and "*" in stream:  # no alias without a *
            for event in yaml.parse(stream, Loader=yaml.SafeLoader):  # events only: nothing is expanded
                if isinstance(event, yaml.AliasEvent):
                    raise yaml.YAMLError(
                        f"YAML aliases (*{event.anchor}) are refused in configs; write the values out instead"
                    )
        return load(stream, *args, **kwargs)

    load_without_aliases.refuses_aliases = True
    return load_without_aliases


class MNISTCLI(LightningCLI):
    def init_parser(self, **kwargs) -> LightningArgumentParser:
        import yaml
        from jsonargparse import get_loader, set_loader

        if not getattr(get_loader("yaml"), "refuses_aliases", False):
            set_loader("yaml", refuse_aliases(get_loader("yaml")), exceptions=(yaml.YAMLError,))
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
        seed = self.config.seed_everything
        if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:
            # numpy's bound, which Lightning would raise a traceback about
            raise UserError(f"--seed_everything {seed} is out of range: use 0 to {2**32 - 1}, or true for a random one")
        ckpt_path = self.config.ckpt_path
        if ckpt_path is not None and not ckpt_path.strip():
            raise UserError("--ckpt_path is empty: pass a checkpoint or 'last', or leave it out to start a new run")
        if ckpt_path == "last":
            root = Path(self.config.trainer.default_root_dir or ".")
            ckpt_path = str(runs.find_last(root, self.config.trainer.logger))
        saved = runs.saved_config(ckpt_path) if ckpt_path else None
        if saved:  # a resume continues the run as it was configured, the options given on top
            super().parse_arguments(parser, ["--config", str(saved), *args, "--ckpt_path", ckpt_path])
        self.config.ckpt_path = ckpt_path

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
            root = Path(config.default_root_dir or ".").resolve() / "lightning_logs"
            version, created = runs.version_for(root, self.config.ckpt_path)
            kwargs["logger"] = RunLogger(root.parent, version=version, default_hp_metric=False)
            self.claimed = root / f"version_{version}" if created else None
            if version is not None and not rank_zero_only.rank:  # the other ranks log into rank zero's folder
                try:
                    runs.lock(root / f"version_{version}")
                except UserError:
                    if self.claimed:
                        runs.release(self.claimed)
                    raise
        if config.plugins is None:
            kwargs["plugins"] = [runs.AtomicCheckpointIO()]
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as err:
            if self.claimed:
                runs.release(self.claimed)
            if isinstance(err, MisconfigurationException) or checks_an_argument(err):
                raise config_error(err) from err
            raise
