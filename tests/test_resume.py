"""Resumes that are refused leave the run as it was; a run stopped in its final test keeps its figures (see
docs/reliability.md). The run folder's lock: tests/test_locks.py."""

import json
import signal

import pytest
from lightning.pytorch import Callback

from conftest import FAST
from mnist_lightning.errors import UserError
from mnist_lightning.fit import cli_main
from mnist_lightning.training import checks


def snapshot(folder):
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(data_dir, tmp_path, monkeypatch):
    """A finished 2-epoch one-cycle run in tmp_path/lightning_logs/version_0."""
    monkeypatch.chdir(tmp_path)
    cli_main(["--data.data_dir", str(data_dir), *FAST])
    return tmp_path / "lightning_logs" / "version_0"


def resume(data_dir, run, *args):
    return cli_main(["--data.data_dir", str(data_dir), *FAST, "--ckpt_path", str(run / "checkpoints/last.ckpt"), *args])


@pytest.mark.parametrize(
    "unfinished, args, message",
    [
        (False, [], "has finished its 2 epochs (it has a metrics.json), so resuming it would train nothing"),
        (False, ["--trainer.max_epochs", "3"], "schedule ends after 16 steps but this run needs 24 (its --trainer."),
        (True, ["--data.batch_size", "64"], "ends after 16 steps but this run needs 30 (its --data.batch_size was 128"),
    ],
)
def test_a_refused_resume_changes_nothing_in_the_run(run, data_dir, unfinished, args, message):
    if unfinished:
        (run / "metrics.json").unlink()
    before = snapshot(run.parent)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resume(data_dir, run, *args)
    assert snapshot(run.parent) == before  # no config.yaml rewritten, no events file added


class CtrlCInTest(Callback):
    def on_test_start(self, trainer, pl_module):
        raise KeyboardInterrupt


def test_ctrl_c_in_the_final_test_then_resume_keeps_the_train_and_val_figures(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    previous = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C once it has seen one
    with pytest.raises(SystemExit):
        cli_main(["--data.data_dir", str(data_dir), *FAST], callbacks=(CtrlCInTest(),))
    signal.signal(signal.SIGINT, previous)
    run = tmp_path / "lightning_logs" / "version_0"
    assert not (run / "metrics.json").exists()
    result = cli_main(["--data.data_dir", str(data_dir), *FAST, "--ckpt_path", "last"])
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc"):
        assert saved[key] == result[key] and 0 <= saved[key] < 5, key
    assert len(saved["epoch_seconds"]) == 2 and saved["global_step"] == 16


def test_a_network_too_big_for_the_memory_is_refused_with_what_it_needs(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checks.available_memory() > 2**20  # the real figure, read from /proc/meminfo here
    monkeypatch.setattr(checks, "available_memory", lambda: 2**29)
    with pytest.raises(UserError, match=r"make 42,450,714 weights: training needs about 0.6 GiB .* has 0.5 GiB avail"):
        cli_main(["--data.data_dir", str(data_dir), *FAST, "--model.hidden1", "50000"])
    assert not (tmp_path / "lightning_logs" / "version_0").exists()  # the claimed folder is released
