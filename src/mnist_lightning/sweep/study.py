"""Search fit's recipe with Optuna: ``python -m mnist_lightning.sweep --n_trials N [fit's options] [--help]``.

Each trial is a whole fit, in lightning_logs/sweep-NAME/trial-N, scored by its best val/acc; trials that
fall below the median of the trials before them at the same epoch are pruned. The test set is used once,
on the best trial, after the search. Every process started against the study's storage, here (--n_jobs)
or on other machines, runs trials of the same study.
"""

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc
import yaml
from optuna.trial import TrialState

from mnist_lightning import fit
from mnist_lightning.errors import UserError, run_main
from mnist_lightning.sweep.report import best_yaml, summary, test_best
from mnist_lightning.sweep.trials import optimize
from mnist_lightning.training import console, speedups

# The search space, by fit's option names. The network and the epochs stay as given, and an option
# given on the command line is fixed: it is left out of the search.
SPACE = {
    "model.lr": lambda trial, name: trial.suggest_float(name, 1e-3, 3e-2, log=True),  # the one-cycle peak
    "data.batch_size": lambda trial, name: trial.suggest_categorical(name, [64, 128, 256]),
    "model.label_smoothing": lambda trial, name: trial.suggest_float(name, 0.0, 0.2),
    "model.weight_decay": lambda trial, name: trial.suggest_float(name, 1e-4, 0.3, log=True),  # AdamW's
    "model.warmup": lambda trial, name: trial.suggest_float(name, 0.05, 0.5),
    "data.shift": lambda trial, name: trial.suggest_int(name, 0, 3),  # pixels, each way
}


class Options(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage
        raise UserError(f"{message} (see --help)")


def options() -> Options:
    parser = Options(
        prog="python -m mnist_lightning.sweep",
        description=__doc__.split("\n\n", 1)[1],
        epilog=f"Searched: {', '.join(SPACE)} (sweep.SPACE). Every other option goes to each trial's fit "
        "(python -m mnist_lightning.fit --help), and one given is fixed, also one of those. "
        "--verbose shows an error's traceback.",
        allow_abbrev=False,  # --n would otherwise take fit's options for its own
    )
    add = parser.add_argument
    add("--n_trials", type=int, required=True, metavar="N", help="trials in the study when done, of every process")
    add(
        "--study_name", metavar="NAME", help="default: the next free N of lightning_logs/sweep-N (--resume: the newest)"
    )
    storage = "an Optuna RDB URL (sqlite:///FILE, postgresql://..., mysql://...) or a journal file's path, for a "
    add("--storage", metavar="URL", help=storage + "shared filesystem; default: SQLite in lightning_logs/sweep-NAME/")
    add(
        "--resume",
        action="store_true",
        help="continue the study, or join it where other processes run it; without --resume, a study that "
        "exists is an error, so two searches never mix by mistake",
    )
    add("--n_jobs", type=int, default=1, metavar="N", help="processes on this machine running trials side by side")
    add("--timeout", type=float, metavar="S", help="seconds after which this process starts no new trial")
    add("--pruner", choices=["median", "none"], default="median", help="Optuna's MedianPruner, or none")
    add("--prune_startup_trials", type=int, default=5, metavar="N", help="trials that end before any is pruned (5)")
    add("--prune_warmup_epochs", type=int, default=1, metavar="N", help="epochs of each trial never pruned (1)")
    add("--worker", action="store_true", help=argparse.SUPPRESS)  # a process --n_jobs started
    return parser


def cli_main(args: list[str] | None = None) -> optuna.Study:
    """Parse the command line, run trials until the study holds --n_trials, then report; returns the study."""
    config, fit_args = options().parse_known_args(sys.argv[1:] if args is None else args)
    if config.n_trials < 1 or config.n_jobs < 1:
        raise UserError(f"--n_trials and --n_jobs must be positive, got {config.n_trials} and {config.n_jobs}")
    if config.storage and not config.study_name:
        raise UserError("--storage needs a --study_name, the name every process that joins the study gives")
    recipe = resolved(fit_args)  # fit's own one-line error for a mistake in its options, before any trial
    root = Path(recipe["trainer"]["default_root_dir"] or ".") / "lightning_logs"
    name = config.study_name or default_name(root, config.resume)
    folder = root / f"sweep-{name}"
    if not config.storage:
        folder.mkdir(parents=True, exist_ok=True)
    url = config.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial is ours to print
    study = open_study(name, url, config)
    folder.mkdir(parents=True, exist_ok=True)
    workers = [spawn(i, name, url, config, fit_args, folder) for i in range(1, config.n_jobs)]
    # SIGTERM (a scheduler's, say) stops the sweep as Ctrl-C does; Lightning's own handler calls this one too.
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        optimize(study, config, fit_args, folder, SPACE)
    except KeyboardInterrupt:
        for worker in workers:
            worker.send_signal(signal.SIGINT)
        print(
            f"stopped by Ctrl-C or SIGTERM; the interrupted trial does not count. To continue: the same command "
            f"with --study_name {name} --resume",
            file=sys.stderr,
        )
        raise
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        for i, worker in enumerate(workers, 1):
            if worker.wait():
                print(f"worker {i} exited with status {worker.returncode}: see {folder}/worker-{i}.log")
    if not config.worker:
        print(summary(study, list(SPACE)))
        if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            path = best_yaml(study, folder / "best.yaml", recipe, resolved([]))
            print(f"best.yaml   python -m mnist_lightning.fit --config {path}")
            print(test_best(study))
        else:
            print("no trial completed: no best.yaml")
        print(f"TensorBoard tensorboard --logdir {folder}")
    return study


def resolved(fit_args: list[str]) -> dict:
    """fit's whole config for these options, as fit parses them; a mistake in them raises fit's error."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        fit.cli_main([*fit_args, "--print_config"])
    return yaml.safe_load(printed.getvalue())


def default_name(root: Path, resume: bool) -> str:
    numbers = [int(p.name[6:]) for p in root.glob("sweep-*") if p.name[6:].isdigit()]
    if resume and not numbers:
        raise UserError(f"--resume: no study under {root}/ to continue; pass its --study_name (and --storage)")
    return str(max(numbers) if resume else max(numbers, default=-1) + 1)


def open_study(name: str, url: str, config) -> optuna.Study:
    with warnings.catch_warnings():  # multivariate and constant_liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: a trial still running counts as a poor one, so that side-by-side trials differ.
        sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True)
    pruner = optuna.pruners.MedianPruner(config.prune_startup_trials, config.prune_warmup_epochs)
    pruner = pruner if config.pruner == "median" else optuna.pruners.NopPruner()
    try:
        if "://" in url:  # SQLite waits up to a minute for another process's write, not 5 s
            timeout = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            storage = rdb_storage(url, timeout)
        else:
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
        exists = name in {s.study_name for s in storage.get_all_studies()}
        if exists and not config.resume:
            raise UserError(f"study {name} exists in {url}; pass --resume to continue it, or another --study_name")
        kind = dict(direction="maximize", sampler=sampler, pruner=pruner)
        return optuna.create_study(study_name=name, storage=storage, load_if_exists=config.resume, **kind)
    except optuna.exceptions.DuplicatedStudyError:  # created by another process a moment ago
        raise UserError(f"study {name} exists in {url}; pass --resume to join it") from None
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as err:
        reason = " ".join(str(err).split("\n")[0].split())
        raise UserError(
            f"--storage {url}: cannot open it ({reason}); give sqlite:///FILE, postgresql://..., mysql://... "
            "(with its driver installed) or a journal file's path"
        ) from None


def rdb_storage(url: str, engine_kwargs: dict) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage; two processes making a new database's tables at once collide on its schema
    version (a UNIQUE constraint, or a table that already exists), and the one that lost simply retries."""
    for attempt in range(10):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
            collided = isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)
            if not collided or attempt == 9:
                raise
            time.sleep(0.2)


def spawn(i: int, name: str, url: str, config, fit_args: list[str], folder: Path) -> subprocess.Popen:
    """One more process joining the study, with its share of the cores and its output in worker-I.log."""
    argv = [sys.executable, "-m", "mnist_lightning.sweep", "--n_trials", str(config.n_trials), "--resume"]
    argv += ["--study_name", name, "--storage", url, "--worker", "--pruner", config.pruner]
    argv += ["--prune_startup_trials", str(config.prune_startup_trials)]
    argv += ["--prune_warmup_epochs", str(config.prune_warmup_epochs)]
    argv += ["--timeout", str(config.timeout)] if config.timeout else []
    threads = str(max(1, (os.cpu_count() or 1) // config.n_jobs))
    with open(folder / f"worker-{i}.log", "w") as log:
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        return subprocess.Popen([*argv, *fit_args], stdout=log, stderr=subprocess.STDOUT, env=env)


def main() -> None:
    console.quiet_lightning()
    try:
        run_main(cli_main)
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # the shell's status for Ctrl-C
    finally:
        speedups.exit_without_gc()
