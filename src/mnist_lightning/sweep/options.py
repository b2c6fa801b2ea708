"""The sweep's command line: fit's own parser with the search's options beside fit's.

Fit's options are parsed as fit parses them, so ``--help`` shows both, a ``--config`` file may hold both
and ``--print_config`` prints both. A value given for one of fit's options, on the command line or in a
``--config`` file, is fixed: every trial runs with it, and it is left out of the search. So is a dimension
that changes nothing given the fixed values: the warm-up, without the one-cycle schedule.
"""

import math
import random
import re
from dataclasses import dataclass, fields
from typing import Literal

import yaml
from jsonargparse import ActionYesNo, ArgumentError

from mnist_lightning.cli import prog, usage_error
from mnist_lightning.data import MNISTDataModule
from mnist_lightning.errors import UserError
from mnist_lightning.model import MNISTClassifier
from mnist_lightning.training.trainer import DEFAULTS, MNISTCLI

# What a trial is scored by, the study maximises and optuna-dashboard names; what pruning compares each epoch.
OBJECTIVE, PRUNED_ON = "val/acc_best", "val/acc"
# The search space, by fit's option names. The network and the epochs stay as given.
SPACE = {
    "model.lr": lambda trial, name: trial.suggest_float(name, 1e-3, 3e-2, log=True),  # the one-cycle peak
    "data.batch_size": lambda trial, name: trial.suggest_categorical(name, [64, 128, 256]),
    "model.label_smoothing": lambda trial, name: trial.suggest_float(name, 0.0, 0.2),
    "model.weight_decay": lambda trial, name: trial.suggest_float(name, 1e-4, 0.3, log=True),  # AdamW's
    "model.warmup": lambda trial, name: trial.suggest_float(name, 0.05, 0.5),
    "data.shift": lambda trial, name: trial.suggest_int(name, 0, 3),  # pixels, each way
}
# When a dimension has an effect, given fit's resolved options; the others always have one (weight decay
# and label smoothing too: AdamW decays with or without a schedule).
MATTERS = {"model.warmup": lambda config: config["model.scheduler"] == "onecycle"}
EPILOG = (
    f"Searched: {', '.join(SPACE)} (sweep.options.SPACE). Each of fit's options given, here or in a --config "
    "file, goes to every trial's fit as it is and is left out of the search. --print_config=skip_default "
    "prints the options given: a config that searches the rest. --verbose shows an error's traceback."
)


@dataclass
class Search:
    """The search's options (every other option goes to each trial's fit)

    Args:
        n_trials: trials in the study when done, of every process; one whose process died is tried again
        study_name: default: the next free N of lightning_logs/sweep-N (--resume: the newest)
        storage: an Optuna RDB URL (sqlite:///FILE, postgresql://..., mysql://...) or a journal file's path,
            for a shared filesystem; default: SQLite in lightning_logs/sweep-NAME/
        n_jobs: processes on this machine running trials side by side, each on its own GPU where there are some
        timeout: seconds after which this process starts no new trial
        pruner: Optuna's MedianPruner, or none
        prune_startup_trials: trials that end before any is pruned
        prune_warmup_epochs: epochs of each trial never pruned
        heartbeat_interval: seconds between a running trial's heartbeats, in an RDB storage
        grace_period: seconds without a heartbeat after which a trial's process counts as dead: its trial is
            failed and tried again; default: twice the interval
    """

    n_trials: int
    study_name: str | None = None
    storage: str | None = None
    n_jobs: int = 1
    timeout: float | None = None
    pruner: Literal["median", "none"] = "median"
    prune_startup_trials: int = 5
    prune_warmup_epochs: int = 1
    heartbeat_interval: int = 60
    grace_period: int | None = None
    resume: bool = False  # a flag, added by SweepCLI

    def __post_init__(self):
        """Every value Optuna or the loop would refuse or misread, refused here: before any folder or study."""
        if self.n_trials < 1 or self.n_jobs < 1:
            raise UserError(f"--n_trials and --n_jobs must be positive, got {self.n_trials} and {self.n_jobs}")
        if self.prune_startup_trials < 0 or self.prune_warmup_epochs < 0:
            raise UserError(
                "--prune_startup_trials and --prune_warmup_epochs must be 0 or more, got "
                f"{self.prune_startup_trials} and {self.prune_warmup_epochs}"
            )
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise UserError(f"--timeout must be a positive number of seconds, got {self.timeout}; leave it out: none")
        grace = self.grace_period
        if self.heartbeat_interval < 1 or not (grace is None or grace > self.heartbeat_interval):
            raise UserError(
                f"--heartbeat_interval must be 1 s or more and --grace_period longer than it, got "
                f"{self.heartbeat_interval} and {self.grace_period}"
            )
        if self.storage is not None and not self.storage.strip():
            raise UserError("--storage is empty: give a database URL or a journal file's path, or leave it out")
        if self.storage and not self.study_name:
            raise UserError("--storage needs a --study_name, the name every process that joins the study gives")
        if self.storage and in_memory(self.storage) and self.n_jobs > 1:
            raise UserError(
                f"--storage {self.storage} is a database in this process's memory, which --n_jobs "
                f"{self.n_jobs} processes cannot share: give a file (sqlite:///FILE) or a server's URL"
            )


def in_memory(url: str) -> bool:
    """Whether an RDB URL is SQLite in memory: gone with its process, and its own in each."""
    return bool(re.fullmatch(r"sqlite(\+\w+)?://(/(:memory:)?)?(\?.*)?", url)) or "mode=memory" in url


class SweepCLI(MNISTCLI):
    """Fit's LightningCLI, parsing only: the trials build their own model, data and Trainer."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(Search, nested_key=None, skip={"resume"})
        # A bare flag, as before, in the group above: a bool option would take --resume true.
        parser.groups["Search"].add_argument(
            "--resume",
            action=ActionYesNo,
            nargs="?",
            default=False,
            help="continue the study, or join it where other processes run it; without --resume, a study that "
            "exists is an error, so two searches never mix by mistake",
        )

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        if self.config.ckpt_path:
            raise UserError("--ckpt_path resumes one run; a sweep's trials are new runs: leave it out")
        # The values given, on the command line or in --config files, and none of the defaults.
        self.given = set(parser.parse_args(args, defaults=False).keys())

    def _set_seed(self) -> None:  # LightningCLI's, after parse_arguments
        # Nothing trains here, so nothing is seeded (nor "Seed set to 42" said); a random seed (true) is drawn
        # once, as LightningCLI draws it, so that every trial, and best.yaml, has the one drawn.
        if self.config.seed_everything is True:
            self.config.seed_everything = random.randrange(2**32)

    def instantiate_classes(self) -> None:
        pass


def parse(args: list[str], description: str) -> tuple[Search, dict, list[str]]:
    """The search's options; the recipe every trial starts from: fit's options as overrides of fit's
    defaults, by dotted name; and the dimensions searched. --help and --print_config exit here."""
    try:
        cli = SweepCLI(
            MNISTClassifier,
            MNISTDataModule,
            args=args,
            run=False,
            **DEFAULTS,  # fit's
            parser_kwargs={"exit_on_error": False, "prog": prog("sweep"), "description": description, "epilog": EPILOG},
        )
    except ArgumentError as err:
        raise usage_error(err) from None
    search = Search(**{f.name: cli.config[f.name] for f in fields(Search)})
    config, defaults = (fit_options(cli.parser, c) for c in (cli.config, cli.parser.get_defaults()))
    recipe = {key: value for key, value in config.items() if key not in defaults or defaults[key] != value}
    check_ranks(config)
    searched = [name for name in SPACE if name not in cli.given and (name not in MATTERS or MATTERS[name](config))]
    if not searched:
        raise UserError(
            f"nothing to search: {', '.join(SPACE)} are each given (a --config file's values count) or of no "
            "effect; leave some out (--print_config=skip_default writes only the options given)"
        )
    return search, recipe, searched


def check_ranks(config: dict) -> None:
    """A trial trains in the sweep's process, and under DDP in the ranks Lightning starts beside it on this
    machine (sweep.ranks); ranks spawned in new processes, or on other machines, would hold no trial."""
    strategy = str(config["trainer.strategy"])
    if (config["trainer.num_nodes"] or 1) > 1:
        raise UserError(
            f"--trainer.num_nodes {config['trainer.num_nodes']}: a sweep's trials train on one machine each; to use "
            "more, start the sweep on each machine with the same --storage and --study_name, and --resume"
        )
    if re.search("spawn|fork|notebook", strategy):
        raise UserError(f"--trainer.strategy {strategy}: a sweep's DDP trials train under ddp: --trainer.strategy ddp")


def fit_options(parser, config) -> dict:
    """fit's options of a config, by dotted name, as a YAML file holds them; a class is one value."""
    dumped = yaml.safe_load(parser.dump(config, skip_unset=False, skip_validation=True))
    ours = {f.name for f in fields(Search)} | {"config", "ckpt_path"}
    return flat({key: value for key, value in dumped.items() if key not in ours})


def flat(config: dict, prefix: str = "") -> dict:
    items = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and "class_path" not in value:
            items.update(flat(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def nested(items: dict) -> dict:
    """A config by dotted name, as a YAML file holds it."""
    config: dict = {}
    for key, value in items.items():
        *groups, name = key.split(".")
        node = config
        for group in groups:
            node = node.setdefault(group, {})
        node[name] = value
    return config
