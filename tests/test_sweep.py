import os
import subprocess
import sys
import time
from dataclasses import fields

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import FAST, run_module
from mnist_lightning import fit
from mnist_lightning.errors import UserError
from mnist_lightning.sweep import study as sweep
from mnist_lightning.sweep.options import SPACE, Search, flat, parse
from mnist_lightning.sweep.trials import counts

# One epoch, batches of 32: a trial takes about a second, and its first epoch already learns the data.
TINY = [*FAST, "--trainer.max_epochs", "1", "--data.batch_size", "32"]


def sweep_args(data_dir, root, *more: str) -> list[str]:
    return ["--data.data_dir", str(data_dir), *TINY, "--trainer.default_root_dir", str(root), *more]


def hparams(run) -> tuple[set[str], list[str]]:
    events = EventAccumulator(str(run))
    events.Reload()
    data = plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/experiment"])
    return {h.name for h in data.experiment.hparam_infos}, [m.name.tag for m in data.experiment.metric_infos]


def test_a_sweep_runs_its_trials_and_writes_a_best_yaml_that_fit_trains(data_dir, tmp_path, capsys):
    args = sweep_args(data_dir, tmp_path, "--n_trials", "3", "--pruner", "none")
    args.remove("--data.batch_size"), args.remove("32")  # searched, this time
    study = sweep.cli_main(args)
    out = capsys.readouterr().out
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state == TrialState.COMPLETE for t in trials)
    folder = tmp_path / "lightning_logs" / "sweep-0"
    for t in trials:
        run = folder / f"trial-{t.number}"
        assert (run / "metrics.json").is_file() and any((run / "checkpoints").glob("best-*.ckpt"))
        names, metrics = hparams(run)  # TensorBoard's HPARAMS: the searched values and the objective
        assert {f"{k.replace('.', '/')}" for k in SPACE} <= names and "val/acc_best" in metrics
    assert "| trial | state | val/acc_best |" in out and "tested once" in out

    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["model"]["lr"] == study.best_params["model.lr"] and best["trainer"]["max_epochs"] == 1
    result = fit.cli_main(["--config", str(folder / "best.yaml")])
    assert result["config"]["data"]["batch_size"] == study.best_params["data.batch_size"]
    assert result["config"]["data"]["data_dir"] == str(data_dir) and "test/acc" in result
    assert (tmp_path / "lightning_logs" / "version_0" / "metrics.json").is_file()

    with pytest.raises(UserError, match="study 0 exists .* pass --resume"):
        sweep.cli_main([*args, "--study_name", "0"])
    resumed = sweep.cli_main([*args, "--resume", "--n_trials", "4"])  # the newest study, to 4 trials
    assert resumed.study_name == "0" and len(resumed.get_trials()) == 4


def test_values_from_a_config_file_are_fixed_and_warmup_is_searched_only_with_its_schedule(data_dir, tmp_path):
    # The tutorial's recipe (configs/tutorial.yaml) and the search's own options, in one file.
    recipe = {"model": {"lr": 1e-3, "scheduler": "none", "label_smoothing": 0.0}}
    recipe["data"] = {"batch_size": 64, "mean": 0.5, "std": 0.5, "shift": 0}
    config = tmp_path / "tutorial.yaml"
    config.write_text(yaml.safe_dump({**recipe, "n_trials": 2, "pruner": "none"}))
    args = ["--config", str(config), "--data.data_dir", str(data_dir), *FAST, "--trainer.max_epochs", "1"]
    study = sweep.cli_main([*args, "--trainer.default_root_dir", str(tmp_path)])
    # Weight decay is all that is left: warm-up does nothing without the one-cycle schedule.
    assert len(study.trials) == 2 and all(list(t.params) == ["model.weight_decay"] for t in study.trials)
    folder = tmp_path / "lightning_logs" / "sweep-0"
    for t in study.trials:
        ran = flat(yaml.safe_load((folder / f"trial-{t.number}" / "config.yaml").read_text()))
        assert (
            all(ran[k] == v for k, v in flat(recipe).items())
            and ran["model.weight_decay"] == t.params["model.weight_decay"]
        )
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best == study.best_trial.user_attrs["recipe"] and "warmup" not in best["model"]
    assert best["model"]["scheduler"] == "none" and best["data"]["batch_size"] == 64


def test_best_yaml_is_the_best_trials_own_recipe_after_a_resume_with_other_options(data_dir, tmp_path, capsys):
    args = sweep_args(data_dir, tmp_path, "--pruner", "none", "--study_name", "r")
    sweep.cli_main([*args, "--n_trials", "1", "--model.weight_decay", "0.01"])
    # Resumed with a rate that cannot learn and no schedule: trial 1 is the worse, and its options not trial 0's.
    study = sweep.cli_main([*args, "--resume", "--n_trials", "2", "--model.lr", "1e-7", "--model.scheduler", "none"])
    assert study.best_trial.number == 0 and not {"model.lr", "model.warmup"} & set(study.trials[1].params)
    folder = tmp_path / "lightning_logs" / "sweep-r"
    best = flat(yaml.safe_load((folder / "best.yaml").read_text()))
    assert best["model.lr"] == study.trials[0].params["model.lr"] and best["model.weight_decay"] == 0.01
    assert best["model.warmup"] == study.trials[0].params["model.warmup"] and "model.scheduler" not in best
    # fit resolves best.yaml to trial 0's own config, but for the sweep's logger and untested trials.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        fit.cli_main(["--config", str(folder / "best.yaml"), "--print_config"])
    plumbing = {"trainer.logger", "trainer.limit_test_batches"}
    again = {k: v for k, v in flat(yaml.safe_load(capsys.readouterr().out)).items() if k not in plumbing}
    ran = flat(yaml.safe_load((folder / "trial-0" / "config.yaml").read_text()))
    assert again == {k: v for k, v in ran.items() if k not in plumbing}


def test_help_print_config_and_config_hold_the_searchs_options_and_fits(tmp_path, capsys):
    with pytest.raises(SystemExit, match="0"):
        sweep.cli_main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m mnist_lightning.sweep")
    assert all(f"--{name} " in out for name in ("n_trials", "resume", "model.lr", "trainer.max_epochs"))
    with pytest.raises(SystemExit):
        sweep.cli_main(["--n_trials", "3", "--model.lr", "0.02", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        fit.cli_main(["--model.lr", "0.02", "--print_config"])
    fits = yaml.safe_load(capsys.readouterr().out)
    # fit's options, with fit's own defaults, and the search's beside them.
    assert {k: printed[k] for k in fits} == fits and set(printed) - set(fits) == {f.name for f in fields(Search)}
    # A config that gives every option, as --print_config writes it, leaves nothing to search.
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(printed))
    with pytest.raises(UserError, match="nothing to search: .*--print_config=skip_default"):
        parse(["--config", str(tmp_path / "all.yaml")], "")
    with pytest.raises(SystemExit):
        sweep.cli_main(["--n_trials", "3", "--model.lr", "0.02", "--resume", "--print_config=skip_default"])
    (tmp_path / "given.yaml").write_text(capsys.readouterr().out)
    search, recipe, searched = parse(["--config", str(tmp_path / "given.yaml")], "")
    assert search.n_trials == 3 and search.resume and recipe == {"model.lr": 0.02}
    assert searched == [name for name in SPACE if name != "model.lr"]


def test_a_trial_below_the_median_is_pruned_and_the_study_goes_on(data_dir, tmp_path, capsys):
    args = sweep_args(data_dir, tmp_path, "--study_name", "p", "--prune_startup_trials", "1")
    args += ["--prune_warmup_epochs", "0", "--trainer.max_epochs", "2"]
    sweep.cli_main([*args, "--n_trials", "1"])
    # A rate that cannot learn: its first epoch is far below the first trial's.
    study = sweep.cli_main([*args, "--resume", "--n_trials", "2", "--model.lr", "1e-7"])
    pruned = study.trials[1]
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [0]
    assert "trial 1 pruned after epoch 1" in capsys.readouterr().out
    run = tmp_path / "lightning_logs" / "sweep-p" / "trial-1"
    # Stopped at the end of the epoch that pruned it, with its curves and checkpoints, and never tested.
    assert list(run.glob("events.out.tfevents.*")) and (run / "checkpoints" / "last.ckpt").is_file()
    assert not (run / "metrics.json").exists()


def test_a_failed_trial_is_recorded_and_the_study_goes_on(data_dir, tmp_path, capsys):
    study = sweep.cli_main(sweep_args(data_dir, tmp_path, "--n_trials", "2", "--model.lr", "1e30"))
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    assert "train/loss is nan" in study.trials[0].user_attrs["error"]
    out = capsys.readouterr().out
    assert out.count("failed: train/loss is nan") == 2 and "no trial completed" in out


def test_mistakes_are_one_line_and_start_no_study(data_dir, tmp_path):
    with pytest.raises(UserError, match="unrecognized arguments: --model.nope"):
        sweep.cli_main(sweep_args(data_dir, tmp_path, "--n_trials", "2", "--model.nope", "1"))
    with pytest.raises(UserError, match="the following arguments are required: n_trials"):
        sweep.cli_main(sweep_args(data_dir, tmp_path))
    with pytest.raises(UserError, match="--ckpt_path resumes one run"):
        sweep.cli_main(sweep_args(data_dir, tmp_path, "--n_trials", "2", "--ckpt_path", "x.ckpt"))
    with pytest.raises(UserError, match="--n_trials and --n_jobs must be positive"):
        sweep.cli_main(sweep_args(data_dir, tmp_path, "--n_trials", "0"))
    with pytest.raises(UserError, match="--resume: no study under"):
        sweep.cli_main(sweep_args(data_dir, tmp_path, "--n_trials", "2", "--resume"))
    assert not (tmp_path / "lightning_logs").exists()
    proc = run_module("mnist_lightning.sweep", "--n_trials", "1", "--storage", "nope://x", "--study_name", "s",
                      cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: --storage nope://x: cannot open it")
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "given, message",
    [
        (["--prune_startup_trials", "-1"], "--prune_startup_trials and --prune_warmup_epochs must be 0 or more"),
        (["--prune_warmup_epochs", "-2"], "--prune_startup_trials and --prune_warmup_epochs must be 0 or more"),
        (["--n_jobs", "0"], "--n_trials and --n_jobs must be positive"),
        (["--timeout", "-5"], "--timeout must be a positive number of seconds, got -5.0"),
        (["--timeout", "0"], "--timeout must be a positive number of seconds"),
        ({"timeout": float("nan")}, "--timeout is nan: it must be a finite number"),
        ({"timeout": float("inf")}, "--timeout is inf: it must be a finite number"),
        (["--heartbeat_interval", "0"], "--heartbeat_interval must be 1 s or more"),
        (["--heartbeat_interval", "5", "--grace_period", "5"], "--grace_period longer than it"),
        (["--storage", " ", "--study_name", "s"], "--storage is empty"),
        (["--storage", "sqlite://", "--study_name", "s", "--n_jobs", "2"], "cannot share"),
        (["--storage", "sqlite:///:memory:", "--study_name", "s", "--n_jobs", "2"], "cannot share"),
        (["--trainer.num_nodes", "2"], "--trainer.num_nodes 2: a sweep's trials train on one machine"),
        (["--trainer.strategy", "ddp_spawn"], "--trainer.strategy ddp_spawn: .* --trainer.strategy ddp"),
    ],
)
def test_the_searchs_own_bad_values_are_one_line_and_leave_nothing_to_resume(data_dir, tmp_path, given, message):
    if isinstance(given, dict):  # in a config file, as a hand-edited one holds them: YAML's .nan and .inf
        (tmp_path / "search.yaml").write_text(yaml.safe_dump(given))
        given = ["--config", str(tmp_path / "search.yaml")]
    with pytest.raises(UserError, match=message):
        sweep.cli_main(sweep_args(data_dir, tmp_path, "--n_trials", "2", *given))
    assert not (tmp_path / "lightning_logs").exists()


def test_a_study_that_cannot_be_written_is_one_line_naming_the_cause(tmp_path):
    optuna.create_study(study_name="old", storage=f"sqlite:///{tmp_path / 'ro.db'}")
    # A read-only database, as on a read-only mount (root may write any file, so chmod would not do).
    url = f"sqlite:///file:{tmp_path / 'ro.db'}?mode=ro&uri=true"
    proc = run_module("mnist_lightning.sweep", "--n_trials", "1", "--storage", url, "--study_name", "s",
                      cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot write the study to ") and "readonly database" in proc.stderr
    assert not (tmp_path / "lightning_logs").exists()


def test_a_fits_own_check_of_a_nan_reaches_the_sweep_as_one_line(data_dir, tmp_path):
    (tmp_path / "nan.yaml").write_text("data:\n  mean: .nan\n")
    proc = run_module("mnist_lightning.sweep", *sweep_args(data_dir, tmp_path, "--n_trials", "2"), "--config",
                      str(tmp_path / "nan.yaml"), cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == "error: --data.mean is nan: it must be a finite number"
    assert not (tmp_path / "lightning_logs").exists()  # refused with fit's options, before any study


def test_a_trial_whose_options_fit_refuses_does_not_count(data_dir, tmp_path):
    # Refused when the trial's fit sets its data up, not when the options are parsed: the study exists by then.
    proc = run_module("mnist_lightning.sweep", *sweep_args(data_dir, tmp_path, "--n_trials", "2"),
                      "--data.val_size", "5000", cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: val_size 5000 leaves no training data")
    # The refused trial ran nothing and does not count: the command, fixed and resumed, runs both trials.
    study = sweep.cli_main(sweep_args(data_dir, tmp_path, "--n_trials", "2", "--resume", "--pruner", "none"))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


def test_only_finished_running_and_their_own_failures_count_toward_n_trials():
    def trial(state, **attrs):
        return optuna.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None, user_attrs=attrs)

    assert counts(trial(TrialState.COMPLETE)) and counts(trial(TrialState.PRUNED)) and counts(trial(TrialState.RUNNING))
    assert counts(trial(TrialState.FAIL, error="train/loss is nan"))  # the recipe's own result
    assert not counts(trial(TrialState.FAIL))  # its process died: failed by the heartbeat, and retried
    assert not counts(trial(TrialState.FAIL, uncounted="interrupted")) and not counts(trial(TrialState.WAITING))


def test_a_one_epoch_trial_reports_its_value_and_is_never_pruned_on_it(data_dir, tmp_path):
    args = sweep_args(data_dir, tmp_path, "--study_name", "e", "--prune_startup_trials", "1")
    args += ["--prune_warmup_epochs", "0"]
    sweep.cli_main([*args, "--n_trials", "1"])
    # A rate that cannot learn: below the median, at the last epoch, where nothing is pruned.
    study = sweep.cli_main([*args, "--resume", "--n_trials", "2", "--model.lr", "1e-7"])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(list(t.intermediate_values) == [0] for t in study.trials)
    assert study.trials[1].intermediate_values[0] < study.trials[0].intermediate_values[0]


def test_without_optuna_the_sweep_says_what_to_install(tmp_path, monkeypatch, capsys):
    # Optuna's import fails, as where the sweep extra is not installed.
    code = "import sys; sys.modules['optuna'] = None; from mnist_lightning.sweep.study import main; main()"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code, "--n_trials", "1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and not (tmp_path / "lightning_logs").exists()
    assert proc.stderr == "error: the sweep needs optuna, not installed: pip install 'mnist-lightning[sweep]'\n"
    # --help needs none of it.
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(SystemExit, match="0"):
        sweep.cli_main(["--help"])
    assert "--n_trials" in capsys.readouterr().out


@pytest.mark.slow
def test_n_jobs_starts_a_worker_that_runs_trials_of_the_same_study(data_dir, tmp_path, capsys):
    study = sweep.cli_main(sweep_args(data_dir, tmp_path, "--n_trials", "3", "--n_jobs", "2", "--pruner", "none"))
    log = (tmp_path / "lightning_logs" / "sweep-0" / "worker-1.log").read_text()
    trials = [t for t in study.trials if "uncounted" not in t.user_attrs]
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    # The worker joined the study with the same options (it may start after the trials are done), and left
    # the report to this process.
    out = capsys.readouterr().out
    assert "exited with status" not in out and "| trial |" in out and "| trial |" not in log, log
    assert all(set(t.params) == set(SPACE) - {"data.batch_size"} for t in trials)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_processes_started_at_once_share_one_study(data_dir, tmp_path, storage):
    url = f"sqlite:///{tmp_path / 'study.db'}" if storage == "sqlite" else str(tmp_path / "study.log")
    args = sweep_args(data_dir, tmp_path, "--n_trials", "4", "--storage", url, "--study_name", "two", "--resume")
    cmd = [sys.executable, "-m", "mnist_lightning.sweep", *args, "--pruner", "none"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    time.sleep(0.1)
    procs.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    storage = (
        url if storage == "sqlite" else optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    )
    trials = [t for t in optuna.load_study(study_name="two", storage=storage).trials if "uncounted" not in t.user_attrs]
    numbers = sorted(t.number for t in trials)
    assert len(trials) == 4 and len(set(numbers)) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(f"trial {n}:" in "".join(outs) for n in numbers)
    assert all(
        "| trial | state |" in out for out in outs
    )  # each its table (the first to end, of a study still running)
    folder = tmp_path / "lightning_logs" / "sweep-two"
    assert sorted(p.name for p in folder.glob("trial-*")) == sorted(f"trial-{n}" for n in numbers)
    for n in numbers:  # one writer a folder: one events file, one config
        assert len(list((folder / f"trial-{n}").glob("events.out.tfevents.*"))) == 1
