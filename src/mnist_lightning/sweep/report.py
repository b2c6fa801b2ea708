"""What a sweep reports when done: the table of trials, best.yaml, and the best trial's test accuracy."""

import contextlib
import io
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from mnist_lightning.files.outputs import atomic_write
from mnist_lightning.sweep.options import SPACE
from mnist_lightning.training.console import here


def summary(study: optuna.Study, searched: list[str]) -> str:
    """A markdown table of the study's trials, best first, under a line that counts them by state."""
    trials = [t for t in study.get_trials(deepcopy=False) if "uncounted" not in t.user_attrs]
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    head = f"study {study.study_name}: {len(trials)} trials, " + ", ".join(
        f"{n} {s.name.lower()}" for s, n in counts.items() if n
    )
    columns = [name for name in searched if any(name in t.params for t in trials)]
    rows = [
        "| trial | state | val/acc_best | " + " | ".join(columns) + " | seconds |",
        "|---" * (len(columns) + 4) + "|",
    ]
    # Complete trials first, best first; a pruned trial's figure is its val/acc at the epoch that pruned it.
    for t in sorted(trials, key=lambda t: (t.state != TrialState.COMPLETE, -(t.value or 0), t.number)):
        cells = [str(t.number), t.state.name.lower(), f"{t.value:.4f}" if t.value is not None else ""]
        cells += [f"{t.params[name]:.4g}" if name in t.params else "" for name in columns]
        cells.append(f"{t.user_attrs['seconds']:.1f}" if "seconds" in t.user_attrs else "")
        rows.append("| " + " | ".join(cells) + " |")
    if counts[TrialState.COMPLETE]:
        best = study.best_trial
        rows.append(f"\nbest trial {best.number}: val/acc_best {best.value:.4f} with " + params_text(best.params))
    return "\n".join([head, "", *rows])


def params_text(params: dict) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in params.items())


def best_yaml(study: optuna.Study, path: Path) -> Path | None:
    """Write the best trial's own recipe, fit's options as overrides of its defaults, which
    ``fit --config best.yaml`` trains again; None for a trial that recorded none (an older version's)."""
    best = study.best_trial
    if "recipe" not in best.user_attrs:
        return None
    text = f"# Trial {best.number}, the best of sweep {study.study_name}: val/acc_best {best.value:.4f}.\n"
    recipe = yaml.safe_dump(best.user_attrs["recipe"], sort_keys=False)
    atomic_write(path, lambda file: file.write((text + recipe).encode()))
    return path


def report(study: optuna.Study, folder: Path) -> None:
    """Print the table, write best.yaml and test the best trial, once the search is done."""
    print(summary(study, list(SPACE)))
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        print("no trial completed: no best.yaml")
    else:
        path, number = best_yaml(study, folder / "best.yaml"), study.best_trial.number
        print(f"best.yaml   python -m mnist_lightning.fit --config {path}" if path else f"best.yaml   none: "
              f"trial {number} recorded no recipe (an older version ran it)")  # fmt: skip
        print(test_best(study))
    print(f"TensorBoard tensorboard --logdir {folder}")


def test_best(study: optuna.Study) -> str:
    """The best trial's test accuracy, by the evaluate command: the test set's one use in the search, after it.
    Its full report goes to best.eval.json beside the checkpoint."""
    from mnist_lightning import evaluate

    best = study.best_trial
    ckpt = best.user_attrs.get("best_model_path")
    if not (ckpt and Path(ckpt).is_file()):
        return f"test        trial {best.number}'s checkpoint, {ckpt}, is not on this machine: evaluate it there"
    with contextlib.redirect_stdout(io.StringIO()):  # the per-class table is in the JSON; one line here
        result = evaluate.cli_main(["--ckpt_path", ckpt])
    return f"test/acc    {result['accuracy']:.4f} (trial {best.number}, tested once, now: {here(ckpt)})"
