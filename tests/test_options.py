"""Options no signature can refuse: a NaN or infinite float, a URL where fit writes a folder. Each is one
line naming the option, before anything is created."""

import pytest

from conftest import FAST
from mnist_lightning.errors import UserError, run_main
from mnist_lightning.fit import cli_main
from mnist_lightning.model import MNISTClassifier


def refused(args, tmp_path, monkeypatch, capsys) -> str:
    """The error line of a fit refused in tmp_path, checking it left tmp_path as it was."""
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "Traceback" not in "\n".join(err), err
    assert sorted(tmp_path.rglob("*")) == before  # no folder named memory:, no run, no download
    return err[-1]


@pytest.mark.parametrize(
    "args, option",
    [
        (["--trainer.default_root_dir", "memory://runs"], "--trainer.default_root_dir memory://runs"),
        (["--checkpoint.dirpath", "gs://bucket/ckpts"], "--checkpoint.dirpath gs://bucket/ckpts"),
        (
            ["--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", "s3://bucket/runs"],
            "--trainer.logger.save_dir s3://bucket/runs",
        ),
        (
            ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "file:///tmp/x"],
            "--trainer.logger.save_dir file:///tmp/x",
        ),
        (
            ["--trainer.profiler", "SimpleProfiler", "--trainer.profiler.dirpath", "hdfs://nn/prof"],
            "--trainer.profiler.dirpath hdfs://nn/prof",
        ),
        (
            ["--trainer.callbacks", "ModelCheckpoint", "--trainer.callbacks.dirpath", "az://c/ckpts"],
            "--trainer.callbacks[0].dirpath az://c/ckpts",
        ),
        (["--data.data_dir", "s3://bucket/mnist"], "--data.data_dir s3://bucket/mnist"),
        (["--ckpt_path", "s3://bucket/last.ckpt"], "--ckpt_path s3://bucket/last.ckpt"),
    ],
)
def test_a_url_for_a_folder_is_refused_naming_the_option(data_dir, tmp_path, monkeypatch, capsys, args, option):
    args = [*args, "--data.data_dir", str(data_dir), *FAST] if "--data.data_dir" not in args else [*args, *FAST]
    line = refused(args, tmp_path, monkeypatch, capsys)
    assert line == f"error: {option}: fit reads and writes local folders only, not URLs; pass a folder (a " + (
        "bucket mounted as one works)"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.lr", ".nan"], "--model.lr is nan"),
        (["--model.weight_decay", ".inf"], "--model.weight_decay is inf"),
        (["--model.label_smoothing=-.inf"], "--model.label_smoothing is -inf"),
        (["--trainer.gradient_clip_val", ".NaN"], "--trainer.gradient_clip_val is nan"),
        (["--trainer.limit_train_batches", ".inf"], "--trainer.limit_train_batches is inf"),
        (["--data.std", ".inf"], "--data.std is inf"),
        (["--checkpoint.every_n_epochs", "1", "--trainer.val_check_interval", ".nan"], "--trainer.val_check_interval"),
    ],
)
def test_a_non_finite_float_is_refused_naming_the_option(data_dir, tmp_path, monkeypatch, capsys, args, message):
    line = refused(["--data.data_dir", str(data_dir), *FAST, *args], tmp_path, monkeypatch, capsys)
    assert line.startswith(f"error: {message}") and line.endswith(": it must be a finite number"), line


def test_a_nan_in_a_config_file_is_refused(data_dir, tmp_path, monkeypatch, capsys):
    # What a hand-edited best.yaml looks like to fit --config.
    config = tmp_path.parent / f"{tmp_path.name}-best.yaml"
    config.write_text(f"model:\n  lr: .nan\n  weight_decay: 0.0\ndata:\n  data_dir: {data_dir}\n")
    line = refused(["--config", str(config), *FAST], tmp_path, monkeypatch, capsys)
    assert line == "error: --model.lr is nan: it must be a finite number"


def test_a_nan_in_a_resumed_runs_config_is_refused(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli_main(["--data.data_dir", str(data_dir), *FAST, "--trainer.max_epochs", "1"])
    run = tmp_path / "lightning_logs" / "version_0"
    (run / "metrics.json").unlink()
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("weight_decay: 0.0", "weight_decay: .inf"))
    line = refused(["--ckpt_path", "last"], tmp_path, monkeypatch, capsys)
    assert line == "error: --model.weight_decay is inf: it must be a finite number"


def test_the_model_refuses_a_nan_learning_rate_given_in_python():
    with pytest.raises(UserError, match="lr must be positive and weight_decay not negative, got nan and 0.0"):
        MNISTClassifier(lr=float("nan"))
