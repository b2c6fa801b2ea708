"""A sweep's trials: each one whole fit, told to the study as complete, pruned or failed."""

import json
import os
import time
import warnings
from pathlib import Path

import optuna
import torch
import yaml
from lightning.pytorch import Callback
from optuna.trial import Trial, TrialState

from mnist_lightning import fit
from mnist_lightning.errors import UserError
from mnist_lightning.sweep import ranks
from mnist_lightning.sweep.options import OBJECTIVE, PRUNED_ON, nested
from mnist_lightning.sweep.storage import beating, has_heartbeat


class Pruning(Callback):
    """Reports each epoch's val/acc to the trial, the last one included, and stops the fit where the pruner
    says so, but never at the last epoch: stopping then saves nothing, and would throw away a finished trial.

    Under DDP rank zero alone holds the trial (``trial`` None elsewhere) and its verdict is broadcast, so
    that every rank stops at the same epoch. The TrialPruned is held until the epoch that pruned the trial
    has written its checkpoints (they are written after this hook): the fit stops then, before any test.
    Not optuna-integration's callback: its one hook is the one replaced here, and its DDP mode is for
    ranks spawned with a copy of the trial."""

    def __init__(self, trial: Trial | None):
        self.trial, self.pruned_at = trial, None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        prune, epoch = False, trainer.current_epoch
        if self.trial is not None:
            self.trial.report(float(trainer.callback_metrics[PRUNED_ON]), step=epoch)
            last = epoch + 1 >= (trainer.max_epochs or 0) > 0
            prune = not last and self.trial.should_prune()
        if trainer.strategy.broadcast(prune):
            self.pruned_at, trainer.should_stop = epoch, True

    def on_train_end(self, trainer, pl_module) -> None:
        if self.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at epoch {self.pruned_at}")


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts toward --n_trials: finished, or running. One that failed in its own training
    (a NaN loss) is that recipe's result and counts; one whose process died (failed by the heartbeat, and
    asked again), was interrupted or was one too many does not, nor one waiting to be retried."""
    if "uncounted" in trial.user_attrs or trial.state == TrialState.WAITING:
        return False
    return trial.state != TrialState.FAIL or "error" in trial.user_attrs


def counted(study: optuna.Study, up_to: int | None = None) -> int:
    """The study's trials that count, up to a number."""
    return sum(counts(t) and (up_to is None or t.number <= up_to) for t in study.get_trials(deepcopy=False))


def optimize(study: optuna.Study, options, recipe: dict, space: dict, folder: Path) -> None:
    """Run trials of the study, one after another, until it holds ``options.n_trials`` (or the timeout)."""
    if options.n_jobs > 1:  # this process's share of the cores; the workers get theirs through the environment
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // options.n_jobs))
    start = time.monotonic()
    while True:
        if options.timeout and time.monotonic() - start > options.timeout:
            print(f"--timeout {options.timeout:g} s reached: no new trial in this process")
            break
        # A trial whose process died (kill -9, a lost machine) is failed once its heartbeat is older than the
        # grace period, and its parameters are asked again; until then it is running, and counts.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        if counted(study) >= options.n_trials:
            running = any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
            if not (running and has_heartbeat(study)):
                break
            time.sleep(min(options.heartbeat_interval, 5))  # for the study's last trials: finished, or stale
            continue
        with warnings.catch_warnings():  # "supposed to be used with Study.optimize": beating() is ours
            warnings.simplefilter("ignore")
            trial = study.ask()
        if counted(study, up_to=trial.number) > options.n_trials:  # another process asked at the same moment
            trial.set_user_attr("uncounted", "one too many: the study had its trials")
            study.tell(trial, state=TrialState.FAIL)
            break
        with beating(study, trial):
            run_trial(study, trial, recipe, space, folder, options.pruner == "median")
    ranks.finish()


def run_trial(study: optuna.Study, trial: Trial, recipe: dict, space: dict, folder: Path, prune: bool) -> None:
    """One fit of ``recipe`` (fit's options by dotted name) with the trial's values of ``space``, told to the
    study as complete, pruned or failed."""
    params = {name: suggest(trial, name) for name, suggest in space.items()}
    # The trial's own recipe, which best.yaml copies: fit --config best.yaml trains this trial again.
    own = nested({**recipe, **params})
    trial.set_user_attr("recipe", own)
    run = folder / f"trial-{trial.number}"
    trial.set_user_attr("run", str(run.resolve()))
    print(f"trial {trial.number}: " + ", ".join(f"{k} {v:.4g}" for k, v in params.items()), flush=True)
    args = fit_args(own, folder, run.name, searched=list(params))
    ranks.share(args, prune)  # with a DDP trial's other ranks, which follow this one
    started = time.perf_counter()
    try:
        result = fit.cli_main(args, callbacks=(Pruning(trial),) if prune else ())
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        (frozen,) = (t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        epoch, value = max(frozen.intermediate_values.items())
        print(f"trial {trial.number} pruned after epoch {epoch + 1}: {PRUNED_ON} {value:.4f} is below the median "
              f"of the trials before it; not tested; its curves and checkpoints to then are in {run}")  # fmt: skip
        return
    except UserError as err:
        trial.set_user_attr("error", str(err))
        if not run.exists():  # it failed before its fit began: the options are wrong, for every trial
            trial.set_user_attr("uncounted", "its options were refused: nothing ran")  # a fixed resume runs all
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, state=TrialState.FAIL)
        print(f"trial {trial.number} failed: {err}; the search goes on")
        return
    except (KeyboardInterrupt, SystemExit):  # Lightning turns a Ctrl-C during a fit into SystemExit(1)
        trial.set_user_attr("uncounted", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        raise KeyboardInterrupt from None
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("seconds", time.perf_counter() - started)
    trial.set_user_attr("best_model_path", str(Path(result["best_model_path"]).resolve()))
    study.tell(trial, result[OBJECTIVE])


def fit_args(own: dict, folder: Path, version: str, searched: list[str]) -> list[str]:
    """fit's command line for a trial's recipe, logging to folder/version and not tested: the test set is
    looked at once, for the best trial, after the search."""
    where = {"save_dir": str(folder.resolve()), "name": "", "version": version, "default_hp_metric": False}
    where["ticked"] = [name.replace(".", "/") for name in searched]  # HPARAMS opens on the searched settings
    logger = {"class_path": "mnist_lightning.training.tensorboard.RunLogger", "init_args": where}
    return ["--config", yaml.safe_dump(own), "--trainer.limit_test_batches=0", f"--trainer.logger={json.dumps(logger)}"]
