"""Options no signature can refuse: a URL where fit writes a folder. Each is one line naming the option,
before anything is created."""

import pytest

from conftest import FAST
from mnist_lightning.errors import run_main
from mnist_lightning.fit import cli_main


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
