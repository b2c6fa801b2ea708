import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import FAST, run_module
from mnist_lightning.errors import UserError
from mnist_lightning.fit import cli_main
from mnist_lightning.training import tensorboard as report
from mnist_lightning.training.speedups import NoProfiler


def scalars(version_dir: Path) -> dict[str, list[float]]:
    # Fit and test each open a writer, so a run holds two event files; TensorBoard reads them as one.
    events = EventAccumulator(str(version_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_print_config_shows_the_default_recipe(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "scheduler: onecycle" in out and "hidden1: 128" in out and "batch_size: 128" in out


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0
    assert "--model.lr LR Adam's learning rate" in out and "(type: float, default: 0.005)" in out


def test_seed_config_overrides_default(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--config", str(Path(__file__).parents[1] / "configs" / "tutorial.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "batch_size: 64" in out and "scheduler: none" in out and "mean: 0.5" in out


def test_in_process_fit_learns_the_synthetic_digits(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli_main(["--data.data_dir", str(data_dir), *FAST, "--trainer.max_epochs", "3"])
    assert result["test/acc"] > 0.9  # the bars are unmistakable; chance is 0.1
    assert result["val/acc_best"] >= result["val/acc"] - 1e-6
    assert Path(result["best_model_path"]).is_file()
    saved = json.loads((tmp_path / "lightning_logs" / "version_0" / "metrics.json").read_text())
    assert saved["test/acc"] == result["test/acc"] and saved["config"]["data"]["val_size"] == 100


def test_overfit_batches_trains_on_the_same_whole_batches(data_dir, tmp_path, monkeypatch):
    """Lightning swaps in a SequentialSampler for --trainer.overfit_batches; batches must stay whole."""
    monkeypatch.chdir(tmp_path)
    args = ["--data.data_dir", str(data_dir), *FAST, "--trainer.overfit_batches", "2", "--trainer.max_epochs", "3"]
    result = cli_main([*args, "--data.batch_size", "16"])
    assert result["global_step"] == 6
    assert result["train/acc"] > 0.9  # 32 images seen three times


@pytest.mark.parametrize("profiler", [None, "simple"])
def test_no_profiler_by_default_and_lightnings_on_request(data_dir, tmp_path, monkeypatch, caplog, profiler):
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO")
    actions = []
    original = NoProfiler.profile
    monkeypatch.setattr(NoProfiler, "profile", lambda self, name: actions.append(name) or original(self, name))
    cli_main(["--data.data_dir", str(data_dir), *FAST, *(["--trainer.profiler", profiler] if profiler else [])])
    report = "FIT Profiler Report" in caplog.text
    if profiler:
        assert report and not actions
    else:
        assert not report and "run_training_batch" in actions and "[Strategy]SingleDeviceStrategy.backward" in actions


def test_steps_read_no_tensor_value_on_the_host_but_on_logging_steps(data_dir, tmp_path, monkeypatch):
    """On a GPU each .item(), bool(tensor) or .tolist() waits for the device. Within a training or
    validation step none may happen, except the NaN check on the steps Lightning logs on."""
    monkeypatch.chdir(tmp_path)
    reads, where = [], {"step": None}

    def counted(name, original):
        def read(self, *args, **kwargs):
            if where["step"] is not None:
                reads.append((where["step"], name))
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))

    class Where(Callback):  # records where the reads that follow happen; None between steps
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            where["step"] = trainer.global_step

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            where["step"] = "validation"

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            where["step"] = None  # after every other callback's on_train_batch_end: listed last

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            where["step"] = None

    result = cli_main(
        ["--data.data_dir", str(data_dir), *FAST, "--trainer.log_every_n_steps", "5"], callbacks=[Where()]
    )
    logging_steps = [step for step in range(result["global_step"]) if (step + 1) % 5 == 0]
    assert result["global_step"] == 16 and logging_steps == [4, 9, 14]  # 900 images in batches of 128, 2 epochs
    assert reads == [(step, "__bool__") for step in logging_steps]  # the NaN check, and nothing else


def test_epoch_metrics_count_in_float32_whatever_the_precision(data_dir, tmp_path, monkeypatch):
    """bf16-true casts the module; a bfloat16 count would stop at 256 (and a loss sum lose its digits)."""
    monkeypatch.chdir(tmp_path)
    dtypes = set()

    class Record(Callback):
        def on_test_epoch_end(self, trainer, model):
            for metric in (model.train_metrics, model.val_metrics, model.test_metrics):
                dtypes.update(state.dtype for state in (metric.loss_sum, metric.correct, metric.count))
            dtypes.add(model.val_acc_best.max_value.dtype)

    result = cli_main(
        ["--data.data_dir", str(data_dir), *FAST, "--trainer.precision", "bf16-true"], callbacks=[Record()]
    )
    assert dtypes == {torch.float32}
    assert result["test/acc"] > 0.9  # bfloat16 weights still learn the bars


BAR = ["--trainer.enable_progress_bar", "true"]  # as on a terminal; in a log or pipe it is off


@pytest.mark.parametrize(
    ("options", "refresh_rate"),
    [
        (BAR, 20),
        (["--trainer.enable_progress_bar", "false"], None),
        ([*BAR, "--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate", "3"], 3),
        (["--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate", "3"], 3),  # a bar asked for
    ],
)
def test_progress_bar_redraws_every_20th_step_unless_configured(
    data_dir, tmp_path, monkeypatch, capsys, options, refresh_rate
):
    """Ours redraws every 20th step, not every step; none when turned off; the user's own bar if given.
    A line per epoch is printed instead of a bar, never beside one."""
    monkeypatch.chdir(tmp_path)
    bars = []

    class Bar(Callback):
        def on_fit_end(self, trainer, model):
            bars.append(trainer.progress_bar_callback)

    cli_main(["--data.data_dir", str(data_dir), *FAST, *options], callbacks=[Bar()])
    assert (bars[0].refresh_rate if bars[0] else None) == refresh_rate
    assert ("epoch 2/2  lr " in capsys.readouterr().out) == (refresh_rate is None)


def test_extending_a_one_cycle_run_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(["--data.data_dir", str(data_dir), *FAST])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="one-cycle schedule ends after 16 steps but this run needs 24"):
        cli_main(
            [
                "--data.data_dir",
                str(data_dir),
                *FAST,
                "--trainer.max_epochs",
                "3",
                "--ckpt_path",
                str(last),
            ]
        )


@pytest.mark.slow
def test_fit_writes_events_checkpoints_metrics_and_resumes(data_dir, tmp_path):
    # A fixed learning rate, so that the run can be extended (a one-cycle schedule has a fixed length).
    args = ["--data.data_dir", str(data_dir), *FAST, "--model.scheduler", "none"]
    proc = run_module("mnist_lightning.fit", *args, cwd=tmp_path)
    version = tmp_path / "lightning_logs" / "version_0"
    # Output is a pipe here, so epochs arrive as plain lines, not a progress bar.
    assert "epoch 2/2" in proc.stdout and "\r" not in proc.stdout + proc.stderr
    # The closing lines: the figures, what the smoothed loss means, where the run is, what to run next.
    last = proc.stdout.strip().splitlines()[-5:]
    assert last[0].startswith("test/acc ") and last[0].endswith(
        "(with label smoothing 0.1; a perfect model scores 0.500)"
    )
    assert last[1:3] == [
        "run         lightning_logs/version_0",
        "TensorBoard tensorboard --logdir lightning_logs/version_0",
    ]
    best = "lightning_logs/version_0/checkpoints/best-epoch"
    assert last[3].startswith(f"evaluate    python -m mnist_lightning.evaluate --ckpt_path {best}")
    assert last[4].startswith(f"predict     python -m mnist_lightning.predict --ckpt_path {best}")
    # Lightning's noise that says nothing about this run: an advert, a deprecation inside Lightning,
    # and a warning about the two checkpoint callbacks, whose first is the val/acc one by construction.
    for noise in ("Tip:", "LeafSpec", "multiple `ModelCheckpoint`", "`Trainer.fit` stopped", "site-packages"):
        assert noise not in proc.stdout + proc.stderr, noise

    tags = scalars(version)
    # TensorBoard's tags are the metric keys of the console and metrics.json: one spelling each.
    for tag in ("train/loss_step", "train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc", "lr"):
        assert tag in tags, tag
    assert "epoch" not in tags  # Lightning's staircase
    assert len(tags["val/acc"]) == 2 and len(tags["test/acc"]) == 1
    assert tags["val/acc_best"] == [max(tags["val/acc"][: i + 1]) for i in range(2)]
    assert tags["train/loss"][1] < tags["train/loss"][0]

    for digit in range(10):
        assert f"test/acc_digit_{digit}" in tags

    events = EventAccumulator(str(version), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"test/confusion_matrix", "test/mistakes", "test/reliability_diagram"}
    hparams = plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/experiment"])
    assert [m.name.tag for m in hparams.experiment.metric_infos] == ["val/acc_best", "test/acc", "test/loss"]
    names = {h.name: h.differs for h in hparams.experiment.hparam_infos}
    assert {"model/lr", "data/batch_size", "trainer/max_epochs", "trainer/seed", "trainer/precision"} <= set(names)
    assert sorted(n for n, ticked in names.items() if ticked) == sorted(report.TICKED)
    (layout,) = events.Tensors("custom_scalars__config__")  # the Custom Scalars tab's charts
    (category,) = layout_pb2.Layout.FromString(layout.tensor_proto.string_val[0]).category
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert charts["loss, train and val"] == ["^train/loss$", "^val/loss$"] and "learning rate" in charts

    checkpoints = sorted(p.name for p in (version / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(p.startswith("best-") for p in checkpoints)
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["test/acc"] == pytest.approx(tags["test/acc"][0])
    assert metrics["best_model_path"].endswith(".ckpt") and metrics["config"]["trainer"]["max_epochs"] == 2
    assert (version / "hparams.yaml").is_file() and (version / "config.yaml").is_file()

    last = version / "checkpoints" / "last.ckpt"
    resumed = run_module(
        "mnist_lightning.fit",
        *args,
        "--trainer.max_epochs",
        "3",
        "--ckpt_path",
        str(last),
        cwd=tmp_path,
        warnings="default",
    )
    # Resuming continues at epoch 3 instead of starting over, without a library's path in a warning.
    assert "epoch 3/3" in resumed.stdout and "epoch 1/3" not in resumed.stdout
    assert "site-packages" not in resumed.stdout + resumed.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MNIST_DATA_DIR"), reason="set MNIST_DATA_DIR to a folder with MNIST/raw/")
def test_default_fit_on_real_mnist(tmp_path):
    data_dir = Path(os.environ["MNIST_DATA_DIR"]).resolve()
    run_module("mnist_lightning.fit", "--data.data_dir", str(data_dir), cwd=tmp_path)
    metrics = json.loads((tmp_path / "lightning_logs" / "version_0" / "metrics.json").read_text())
    # The default recipe measures 98.42-98.54% over seeds 0-2; 97.5% leaves room for platform noise.
    assert metrics["test/acc"] >= 0.975


def test_without_step_logging_or_test_batches_the_run_still_finishes(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--data.data_dir", str(data_dir), *FAST, "--trainer.log_every_n_steps", "0"]
    result = cli_main([*args, "--trainer.limit_test_batches", "0"])
    assert "test/acc" not in result and result["global_step"] == 16 and "train/loss_step" not in result
    assert "the run was not tested" in capsys.readouterr().out
    saved = json.loads((tmp_path / "lightning_logs" / "version_0" / "metrics.json").read_text())
    assert saved["val/acc"] == result["val/acc"]


def test_ckpt_path_last_without_a_logger(data_dir, tmp_path, monkeypatch):
    """With --trainer.logger false, checkpoints go to ROOT/checkpoints/, and `last` finds them there."""
    monkeypatch.chdir(tmp_path)
    args = ["--data.data_dir", str(data_dir), *FAST, "--trainer.logger", "false", "--model.scheduler", "none"]
    cli_main(args)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    (tmp_path / "metrics.json").unlink()  # as if it had been killed: an unfinished run
    result = cli_main(["--trainer.logger", "false", "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert result["global_step"] == 24 and result["config"]["ckpt_path"] == "checkpoints/last.ckpt"
    with pytest.raises(UserError, match="--ckpt_path last finds the runs of the default logger only"):
        cli_main([*args[:-4], "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", ".", "--ckpt_path", "last"])


def test_a_finished_runs_advice_works(data_dir, tmp_path, monkeypatch):
    """The refusal of `--ckpt_path last` on a finished fixed-rate run names a command that then works."""
    monkeypatch.chdir(tmp_path)
    args = ["--data.data_dir", str(data_dir), *FAST, "--model.scheduler", "none"]
    cli_main(args)
    with pytest.raises(
        UserError, match=r"has finished; to train it further pass --ckpt_path (\S+) with a larger"
    ) as err:
        cli_main(["--ckpt_path", "last"])
    ckpt = str(err.value).split("--ckpt_path ")[2].split(" ")[0]
    assert cli_main(["--ckpt_path", ckpt, "--trainer.max_epochs", "3"])["global_step"] == 24


def test_speedups_switch_off_together(data_dir, tmp_path, monkeypatch):
    from lightning.pytorch.profilers import PassThroughProfiler

    from mnist_lightning.training import speedups

    monkeypatch.chdir(tmp_path)
    seen = {}

    class Look(Callback):
        def on_fit_end(self, trainer, model):
            seen[os.environ["MNIST_LIGHTNING_SPEEDUPS"]] = (type(trainer.profiler), speedups.on("loss"))

    for setting in ("all", "none"):
        monkeypatch.setenv("MNIST_LIGHTNING_SPEEDUPS", setting)
        result = cli_main(["--data.data_dir", str(data_dir), *FAST], callbacks=[Look()])
        seen[setting] += (result["test/acc"],)
    assert seen["all"][:2] == (NoProfiler, True) and seen["none"][:2] == (PassThroughProfiler, False)
    assert seen["all"][2] == seen["none"][2]  # they change the time, never a figure
    monkeypatch.setenv("MNIST_LIGHTNING_SPEEDUPS", "profiler,turbo")
    with pytest.raises(UserError, match="MNIST_LIGHTNING_SPEEDUPS names turbo; use all, none or some of loss"):
        cli_main(["--print_config"])


def test_a_value_error_that_is_not_lightnings_verdict_keeps_its_traceback():
    from mnist_lightning.training.trainer import checks_an_argument

    try:
        raise ValueError("a bug of ours")
    except ValueError as err:
        assert not checks_an_argument(err)
    try:
        Trainer(strategy="foo", logger=False)
    except ValueError as err:
        assert checks_an_argument(err)


@pytest.mark.parametrize("module", ["predict", "evaluate", "export"])
def test_the_commands_that_use_a_checkpoint_do_not_import_lightning(module):
    heavy = "m == 'lightning' or m.startswith(('lightning.', 'torchmetrics', 'torchvision'))"
    code = f"import sys, mnist_lightning.{module}; print(sorted(m for m in sys.modules if {heavy}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


@pytest.mark.slow
def test_a_non_editable_install_trains_the_shipped_recipe(data_dir, tmp_path):
    """The recipe lives in the constructors and the CLI's Trainer defaults, not in a file beside the source."""
    source, site = tmp_path / "source", tmp_path / "site"  # built from a copy: the build writes beside it
    root = Path(__file__).parents[1]
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*pip, str(site), str(source)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = tmp_path / "run"
    run.mkdir()

    def fit(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "mnist_lightning.fit", *args], cwd=run, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    code = "import mnist_lightning.fit as f; print(f.__file__)"
    where = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=run).stdout
    assert where.startswith(str(site))  # the installed copy, not the source tree
    config = fit("--print_config")
    for line in ("max_epochs: 5", "lr: 0.005", "scheduler: onecycle", "label_smoothing: 0.1", "batch_size: 128"):
        assert line in config, line
    fit("--data.data_dir", str(data_dir), *FAST)
    metrics = json.loads((run / "lightning_logs" / "version_0" / "metrics.json").read_text())
    assert metrics["config"]["model"]["scheduler"] == "onecycle" and metrics["test/acc"] > 0.9


def test_help_names_the_command_and_heads_each_group_with_a_whole_sentence(capsys):
    from mnist_lightning.data import MNISTDataModule
    from mnist_lightning.model import MNISTClassifier
    from mnist_lightning.training.callbacks import EpochCheckpoint

    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: python -m mnist_lightning.fit ")
    for cls in (MNISTClassifier, MNISTDataModule, EpochCheckpoint):
        summary = cls.__doc__.strip().split("\n\n")[0]  # what jsonargparse heads the group with
        assert "\n" not in summary and f"\n{summary.rstrip('.')}:\n" in out, cls


@pytest.mark.slow
def test_a_command_trains_on_one_thread_unless_told_otherwise(data_dir, tmp_path):
    """cli.threads: one intra-op thread, which a busy machine cannot starve; OMP_NUM_THREADS wins; the
    count is recorded beside the figures, as part of what the seed reproduces."""
    for setting, expected in ((None, 1), ("2", 2)):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | (
            {"OMP_NUM_THREADS": setting} if setting else {}
        )
        root = tmp_path / f"threads-{expected}"
        cmd = [sys.executable, "-m", "mnist_lightning.fit", "--data.data_dir", str(data_dir), *FAST]
        proc = subprocess.run([*cmd, "--trainer.default_root_dir", str(root)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(next(root.glob("lightning_logs/version_0/metrics.json")).read_text())["threads"] == expected


def test_the_same_seed_and_thread_count_give_the_same_weights(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights = []
        for _ in range(2):
            result = cli_main(["--data.data_dir", str(data_dir), *FAST])
            assert result["threads"] == 1
            weights.append(torch.load(result["best_model_path"], weights_only=True)["state_dict"])
    finally:
        torch.set_num_threads(previous)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
