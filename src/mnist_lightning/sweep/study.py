"""Search fit's recipe with Optuna: ``python -m mnist_lightning.sweep --n_trials N [fit's options] [--help]``.

Each trial is a whole fit, in lightning_logs/sweep-NAME/trial-N, scored by its best val/acc; trials that
fall below the median of the trials before them at the same epoch are pruned. The test set is used once,
on the best trial, after the search. Every process started against the study's storage, here (--n_jobs)
or on other machines, runs trials of the same study.
"""

import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from mnist_lightning.errors import UserError, run_main
from mnist_lightning.sweep import ranks
from mnist_lightning.sweep.options import SPACE, Search, parse
from mnist_lightning.training import console, speedups

# Set in the processes that --n_jobs starts: they run trials and leave the report to the first.
WORKER = "MNIST_LIGHTNING_SWEEP_WORKER"


def cli_main(args: list[str] | None = None):
    """Parse the command line, run trials until the study holds --n_trials, then report; returns the study."""
    args = list(sys.argv[1:] if args is None else args)
    if ranks.follows():  # a DDP trial's other rank, started by Lightning's launcher with this command line
        return ranks.follow()
    # fit's one-line error for a mistake in its options, before any trial; --help works without Optuna.
    options, recipe, searched = parse(args, __doc__.split("\n\n", 1)[1])
    require_optuna()
    import optuna

    from mnist_lightning.sweep.report import report  # these import Optuna, now known to be installed
    from mnist_lightning.sweep.storage import open_study, passed_on

    root = Path(recipe.get("trainer.default_root_dir") or ".") / "lightning_logs"
    name = options.study_name or default_name(root, options.resume)
    folder = root / f"sweep-{name}"
    created = not folder.exists()
    if not options.storage:
        folder.mkdir(parents=True, exist_ok=True)
    url = options.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    with written(url, name):
        try:
            with warnings.catch_warnings():  # Optuna marks the heartbeat experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study = open_study(name, url, options)
        except BaseException:
            if created:  # nothing is left of a study that never opened, for a --resume to pick
                shutil.rmtree(folder, ignore_errors=True)
            raise
        folder.mkdir(parents=True, exist_ok=True)
        worker = bool(os.environ.get(WORKER))
        # The workers' command line; the URL's password goes in their environment, not on the command line,
        # which every user of the machine sees.
        joined, secret = passed_on([*args, "--resume", "--study_name", name, "--storage", url], url)
        search(study, options, recipe, searched, folder, [] if worker else joined, secret)
        if not worker:
            report(study, folder)
    return study


def search(
    study, options: Search, recipe: dict, searched: list[str], folder: Path, spawn_args: list[str], secret: dict
) -> None:
    """Run trials here, and with the sweep's ``spawn_args`` (and the environment ``secret``) in --n_jobs - 1 more
    processes, until the study is done."""
    from mnist_lightning.sweep.trials import optimize

    workers = []
    if spawn_args and options.n_jobs > 1:
        visible = gpus()
        workers = [spawn(i, spawn_args, options, folder, visible, secret) for i in range(1, options.n_jobs)]
        os.environ.update(device_env(0, visible))  # this process is worker 0; before CUDA starts in it
    # SIGTERM (a scheduler's, say) stops the sweep as Ctrl-C does; Lightning's own handler calls this one too.
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        optimize(study, options, recipe, {dimension: SPACE[dimension] for dimension in searched}, folder)
    except KeyboardInterrupt:
        for process in workers:
            process.send_signal(signal.SIGINT)
        print(
            f"stopped by Ctrl-C or SIGTERM; the interrupted trial does not count. To continue: the same command "
            f"with --study_name {study.study_name} --resume",
            file=sys.stderr,
        )
        raise
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        for i, process in enumerate(workers, 1):
            if process.wait():
                print(f"worker {i} exited with status {process.returncode}: see {folder}/worker-{i}.log")


@contextlib.contextmanager
def written(url: str, name: str):
    """A study its storage refuses to write (a read-only mount, a full disk) as one line: Optuna's own
    blames "invalid data in the commit"."""
    import optuna

    from mnist_lightning.sweep.storage import hidden, one_line

    try:
        yield
    except optuna.exceptions.StorageInternalError as err:
        why = one_line(reason(err), url)
        raise UserError(
            f"cannot write the study to {hidden(url)} ({why}); make it writable or free some space, then "
            f"continue with --study_name {name} --resume"
        ) from None


def reason(err: BaseException) -> str:
    """The database's own words for an error Optuna wrapped: "attempt to write a readonly database"; they may
    repeat the URL, password and all, which the caller hides."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(getattr(err, "orig", None) or err)


def require_optuna() -> None:
    try:
        importlib.import_module("optuna")
    except ImportError as err:
        needed = err.name or "optuna"
        raise UserError(f"the sweep needs {needed}, not installed: pip install 'mnist-lightning[sweep]'") from None


def default_name(root: Path, resume: bool) -> str:
    numbers = [int(p.name[6:]) for p in root.glob("sweep-*") if p.name[6:].isdigit()]
    if resume and not numbers:
        raise UserError(f"--resume: no study under {root}/ to continue; pass its --study_name (and --storage)")
    return str(max(numbers) if resume else max(numbers, default=-1) + 1)


def spawn(
    i: int, args: list[str], options: Search, folder: Path, visible: list[str], secret: dict[str, str] | None = None
) -> subprocess.Popen:
    """One more process joining the study, with its share of the cores, its own GPU where there are some, and
    its output in worker-I.log: the same command line, which fixes the same options, naming the study this
    one opened; ``secret`` is the environment that holds the storage URL's password."""
    argv = [sys.executable, "-m", "mnist_lightning.sweep", *args]
    threads = str(max(1, (os.cpu_count() or 1) // options.n_jobs))
    with open(folder / f"worker-{i}.log", "w") as log:
        env = {**os.environ, **(secret or {}), "OMP_NUM_THREADS": threads, WORKER: str(i), **device_env(i, visible)}
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them: the list it was given, else all.
    torch counts them by NVML, which leaves CUDA uninitialised, so that this process can still pick one."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [device.strip() for device in given.split(",") if device.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def device_env(worker: int, visible: list[str]) -> dict[str, str]:
    """--n_jobs worker's own GPU, round-robin over those visible; with none, nothing changes."""
    return {"CUDA_VISIBLE_DEVICES": visible[worker % len(visible)]} if visible else {}


def main() -> None:
    console.quiet_lightning()
    try:
        run_main(cli_main)
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # the shell's status for Ctrl-C
    finally:
        speedups.exit_without_gc()
