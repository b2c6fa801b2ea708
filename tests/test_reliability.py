"""Kills, resumes, bad config, non-finite loss, concurrent runs, determinism (see docs/reliability.md)."""

import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from conftest import FAST, run_module, write_dataset
from mnist_lightning.errors import UserError, run_main
from mnist_lightning.files import runs
from mnist_lightning.files.runs import AtomicCheckpointIO, claim_version
from mnist_lightning.fit import cli_main


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture
def good_run(data_dir, tmp_path, monkeypatch) -> Path:
    """A finished run in tmp_path, whose outputs the failing commands below must leave alone."""
    monkeypatch.chdir(tmp_path)
    cli_main(["--data.data_dir", str(data_dir), *FAST])
    return tmp_path / "lightning_logs" / "version_0"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.batch_size", "0"], "batch_size must be positive (and under 2^63), got 0"),
        (["--model.lr", "-1"], "lr must be positive"),
        (["--data.val_size", "5000"], "val_size 5000 leaves no training data"),
        (["--data.dataset", "cifar"], "Expected a typing.Literal['mnist', 'fashion_mnist']. Got value: cifar"),
        (["--data.bogus", "1"], "unrecognized arguments: --data.bogus 1"),
        (["--trainer.accelerator", "gpu"], "check --trainer.accelerator"),
        (["--ckpt_path", "last", "--trainer.default_root_dir", "nowhere"], "no run in"),
        (["--ckpt_path", "last"], "has finished; its one-cycle schedule cannot be extended: start a new run"),
        (["--data.eval_batch_size", "-5"], "eval_batch_size must be positive (and under 2^63), got -5"),
        (
            ["--trainer.enable_progress_bar", "false", "--trainer.callbacks+=TQDMProgressBar"],
            "configured with `enable_progress_bar=False` but found `TQDMProgressBar` in callbacks list.",
        ),
        (["--trainer.strategy", "foo"], "documentation at https://lightning.ai (check --trainer.accelerator"),
        (["--trainer.num_nodes", "0"], "`num_nodes` must be a positive integer, but got 0."),
        (["--checkpoint.mode", "outputs"], "`mode` can be min, max but got outputs"),
        (["--trainer.logger", "CSVLogger"], "--trainer.logger CSVLogger needs --trainer.logger.save_dir (see --help)"),
        # Values that parse but would crash later, each refused before anything is written.
        (["--trainer.max_epochs", "-1"], "one-cycle schedule needs a fixed, positive number of steps, but this run "),
        (["--trainer.limit_train_batches", "0"], "but this run trains no step (see --trainer.max_epochs"),
        (["--seed_everything", str(2**32)], f"--seed_everything {2**32} is out of range: use 0 to {2**32 - 1}"),
        (["--seed_everything", "-5"], "--seed_everything -5 is out of range"),
        (["--ckpt_path", ""], "--ckpt_path is empty: pass a checkpoint or 'last'"),
        (["--model.hidden1", str(10**9)], "a 784-1000000000-64-10 network needs 3162.8 GiB for its float32 weights"),
        (["--data.data_dir", "config.yaml"], "is a file, not a folder: pass the folder holding MNIST/raw/"),
        (["--config", "laughs.yaml"], "YAML aliases (*a) are refused in configs; write the values out instead"),
        # Integers beyond what torch holds (int64), and a root folder through a symlink loop.
        (["--data.split_seed", str(2**63)], f"split_seed must be 0 to 2^63 - 1, got {2**63}"),
        (["--data.batch_size", str(2**70)], f"batch_size must be positive (and under 2^63), got {2**70}"),
        (["--data.eval_batch_size", str(2**63)], "eval_batch_size must be positive (and under 2^63)"),
        (["--data.val_size", str(2**64)], "val_size must be 0 to 2^63 - 1"),
        (["--model.hidden2", str(2**70)], f"hidden sizes must be 1 to 2^31 - 1, got 128 and {2**70}"),
        (["--trainer.default_root_dir", "loop/inside"], "loop/inside cannot be used: it goes through a symlink loop"),
    ],
)
def test_bad_config_is_one_line_and_touches_nothing(good_run, data_dir, capsys, args, message):
    laughs = good_run.parent.parent / "laughs.yaml"  # a "billion laughs": 9**9 strings from 400 bytes
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{new}: &{new} [{', '.join([f'*{old}'] * 9)}]" for old, new in zip("abcdefgh", "bcdefghi", strict=True)]
    laughs.write_text("\n".join(lines) + "\n")
    before = snapshot(good_run.parent)
    capsys.readouterr()
    loop = good_run.parent.parent / "loop"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    args = [str(good_run / a) if a == "config.yaml" else a for a in args]
    args = [str(loop.parent / a) if a.startswith("loop/") else a for a in args]
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, ["--data.data_dir", str(data_dir), *FAST, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err[-1].startswith("error: ") and message in err[-1]
    # The hint at the accelerator options comes with the accelerator's errors only.
    assert ("check --trainer.accelerator" in err[-1]) == ("check --trainer.accelerator" in message)
    assert "Traceback" not in "\n".join(err)
    assert snapshot(good_run.parent) == before
    assert [p.name for p in good_run.parent.iterdir()] == ["version_0"]  # and no new, empty run folder


def test_malformed_yaml_and_verbose(tmp_path, data_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {lr: [0.1\n")
    proc = run_module("mnist_lightning.fit", "--config", str(bad), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    verbose = run_module("mnist_lightning.fit", "--data.batch_size", "0", "--verbose", cwd=tmp_path, check=False)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "UserError" in verbose.stderr


@pytest.mark.slow
def test_uneven_global_batch_over_processes(data_dir, tmp_path):
    """DDP launches processes, so this case runs as a real command (in pytest they would rerun pytest)."""
    args = ["--data.data_dir", str(data_dir), *FAST, "--trainer.devices", "3", "--trainer.accelerator", "cpu"]
    proc = run_module("mnist_lightning.fit", *args, "--trainer.strategy", "ddp", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "global batch_size 128 does not split evenly over 3 processes" in proc.stderr
    assert not list(tmp_path.glob("lightning_logs/version_*"))  # nothing left behind


def test_unwritable_log_folder(tmp_path, data_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, ["--data.data_dir", str(data_dir), *FAST, "--trainer.default_root_dir", str(blocker)])
    assert exit_.value.code == 2 and "cannot create a run folder" in capsys.readouterr().err


class PoisonAt(Callback):
    """Turns the first layer's weights to NaN at the start of an epoch: the loss then is NaN too."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, model):
        if trainer.current_epoch == self.epoch:
            model.net[1].weight.data.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    kept = rf"training stopped and the last good checkpoint, .*{last.name}, is kept"
    with pytest.raises(UserError, match=rf"train/loss is nan at step \d+ \(epoch 2 of 3\); {kept}"):
        cli_main(["--data.data_dir", str(data_dir), *FAST, "--trainer.max_epochs", "3"], callbacks=[PoisonAt(1)])
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert all(torch.isfinite(w).all() for w in weights(last).values())


def test_non_finite_loss_without_checkpoints_keeps_the_logs(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--data.data_dir", str(data_dir), *FAST, "--trainer.enable_checkpointing", "false"]
    with pytest.raises(UserError, match="training stopped and no checkpoint had been written yet"):
        cli_main(args, callbacks=[PoisonAt(1)])
    version = tmp_path / "lightning_logs" / "version_0"
    assert list(version.glob("events.out.tfevents.*")) and not (version / "checkpoints").exists()


def test_a_failed_run_leaves_a_folder_it_did_not_create_alone(data_dir, tmp_path, monkeypatch):
    """A configured logger's folder belongs to the user: a failure deletes nothing in it."""
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    (results / "lightning_logs" / "version_0").mkdir(parents=True)
    mine = results / "lightning_logs" / "version_0" / "notes.txt"
    mine.write_text("my notes")
    logger = ["--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", str(results)]
    logger += ["--trainer.logger.version", "0"]
    with pytest.raises(UserError, match="train/loss is nan"):
        cli_main(["--data.data_dir", str(data_dir), *FAST, *logger], callbacks=[PoisonAt(0)])
    assert mine.read_text() == "my notes"


def test_a_run_that_fails_before_training_removes_only_its_own_folder(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Refuse(Callback):  # fails after the run folder is set up, before the first step
        def on_train_start(self, trainer, model):
            raise UserError("refused")

    class Drop(Callback):  # a user's file appears in the run folder meanwhile
        def setup(self, trainer, model, stage):
            Path(trainer.log_dir, "notes.txt").write_text("mine")

    for callbacks, kept in (([Refuse()], []), ([Drop(), Refuse()], ["version_0"])):
        with pytest.raises(UserError, match="refused"):
            cli_main(["--data.data_dir", str(data_dir), *FAST], callbacks=callbacks)
        assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == kept
    assert (tmp_path / "lightning_logs" / "version_0" / "notes.txt").read_text() == "mine"


# Every precision Lightning accepts on a CPU, with the model summary on (its example input must meet the
# weights' dtype): each trains and tests, or is refused in one line before anything is written.
TRAINS = ["32-true", "64-true", "bf16-true", "bf16-mixed", "16-mixed", "32", "64", "bf16", "16"]
REFUSED = {
    "16-true": "Adam does not train float16 weights (its eps, 1e-8, rounds to 0",
    "transformer-engine": "transformer_engine",
    "transformer-engine-float16": "transformer_engine",
    "8-true": "Expected a typing.Literal[",
}


@pytest.mark.parametrize("precision", TRAINS + list(REFUSED))
def test_every_precision_trains_or_is_one_line(data_dir, tmp_path, monkeypatch, capsys, precision):
    monkeypatch.chdir(tmp_path)
    args = ["--data.data_dir", str(data_dir), *FAST, "--trainer.enable_model_summary", "true"]
    args += ["--trainer.max_epochs", "1", "--trainer.precision", precision]
    if precision in TRAINS:
        result = cli_main(args)
        assert result["test/acc"] > 0.3 and result["global_step"] == 8, precision  # well above chance (0.1)
        return
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("error: ") and REFUSED[precision] in err[-1], err
    assert "Traceback" not in "\n".join(err) and not list(tmp_path.glob("lightning_logs/version_*"))


def test_concurrent_claims_get_distinct_versions(tmp_path):
    versions = []
    threads = [threading.Thread(target=lambda: versions.append(claim_version(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(8))


@pytest.mark.slow
def test_two_runs_started_at_once_use_two_folders(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "mnist_lightning.fit", "--data.data_dir", str(data_dir), *FAST]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in "ab"]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert len(list(tmp_path.glob("lightning_logs/version_*/metrics.json"))) == 2


def interrupt_mid_run(args: list[str], cwd: Path, sig: signal.Signals) -> tuple[subprocess.Popen, str, Path]:
    """Start a fit, send it ``sig`` shortly after its first last.ckpt appears; return it, its stderr, last.ckpt."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "mnist_lightning.fit", *args]
    run = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = cwd / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    while not last.exists() and run.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)
    run.send_signal(sig)
    _, err = run.communicate(timeout=120)
    assert torch.load(last, weights_only=True)["epoch"] < 39  # it really was cut short (of 40 epochs)
    return run, err, last


# Many short epochs, so that a signal lands mid-run.
LONG = [*FAST, "--trainer.max_epochs", "40", "--data.batch_size", "8"]


@pytest.mark.slow
def test_kill_9_then_resume_last_is_bit_identical(data_dir, tmp_path):
    args = ["--data.data_dir", str(data_dir), *LONG]
    (tmp_path / "whole").mkdir()
    run_module("mnist_lightning.fit", *args, cwd=tmp_path / "whole")
    reference = weights(tmp_path / "whole" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")

    killed, _, last = interrupt_mid_run(args, tmp_path, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    interrupted_at = torch.load(last, weights_only=True)["epoch"]

    # --ckpt_path last alone: the run's own config.yaml brings back its data and its 40 epochs.
    resumed = run_module("mnist_lightning.fit", "--ckpt_path", "last", cwd=tmp_path)
    assert f"epoch {interrupted_at + 2}/40" in resumed.stdout and "epoch 1/40" not in resumed.stdout
    assert "epoch 40/40" in resumed.stdout
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]  # same folder
    final = weights(last)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference)


WRITER = """
import sys, torch
from mnist_lightning.files.runs import AtomicCheckpointIO
io, step = AtomicCheckpointIO(), 0
while True:
    step += 1
    io.save_checkpoint({"step": step, "w": torch.full((2_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_never_tears_it(tmp_path):
    target = tmp_path / "last.ckpt"
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.0, 0.15, size=8):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # one checkpoint is complete; the kill lands in a later write
        time.sleep(delay)
        writer.kill()
        writer.wait()
        saved = torch.load(target, weights_only=True)
        assert torch.equal(saved["w"], torch.full((2_000_000,), float(saved["step"])))
    AtomicCheckpointIO().save_checkpoint({"step": 0}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # killed writers' temporary files swept


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)

    def no_space(obj, file):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match="No space left on device.*any earlier one is kept"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resume_refuses_bad_checkpoints(good_run, data_dir, capsys):
    last = good_run / "checkpoints" / "last.ckpt"
    text = good_run.parents[1] / "notes.txt"
    text.write_text("not a checkpoint")
    before = snapshot(good_run)
    for ckpt, extra, message in [
        (last, ["--model.hidden1", "32"], "other layer sizes: net.1.weight: checkpoint (128, 784) vs model (32, 784)"),
        (text, [], "truncated, corrupt or not a PyTorch checkpoint"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            run_main(cli_main, ["--data.data_dir", str(data_dir), *FAST, *extra, "--ckpt_path", str(ckpt)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert snapshot(good_run) == before
    assert [p.name for p in good_run.parent.iterdir()] == ["version_0"]  # no empty run folder left


def test_unknown_key_in_a_yaml_file(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("data:\n  bogus: 1\n")
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, ["--config", str(config)])
    assert exit_.value.code == 2 and "does not accept option 'bogus'" in capsys.readouterr().err


def test_corrupt_dataset_through_the_command_line(good_run, tmp_path, capsys):
    raw = tmp_path / "broken" / "MNIST" / "raw"
    write_dataset(raw)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    before = snapshot(good_run.parent)
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, ["--data.data_dir", str(tmp_path / "broken"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "train-images-idx3-ubyte should be" in err[-1] and "Traceback" not in "".join(err)
    assert snapshot(good_run.parent) == before
    assert [p.name for p in good_run.parent.iterdir()] == ["version_0"]


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, ["--data.data_dir", str(data_dir), *FAST, "--checkpoint.dirpath", "a_file/ckpts"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "a_file/ckpts (Not a directory); pass --checkpoint.dirpath" in err
    assert not list(tmp_path.glob("lightning_logs/version_*"))  # failed before training: no run folder left


def test_full_disk_for_metrics_json_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real_write = runs.atomic_write

    def full(path, write):
        if path.name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, write)

    monkeypatch.setattr(runs, "atomic_write", full)
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, ["--data.data_dir", str(data_dir), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "metrics.json (No space left on device); the checkpoints are kept" in err[-1]
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_an_unattributed_os_error_is_one_line(capsys):
    def fails(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "lightning_logs/version_0/events.out.tfevents")

    with pytest.raises(SystemExit) as exit_:
        run_main(fails, [])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err
        == "error: [Errno 28] No space left on device: 'lightning_logs/version_0/events.out.tfevents'\n"
    )


@pytest.mark.slow
def test_sigterm_exits_non_zero_saying_how_to_resume(data_dir, tmp_path):
    """SLURM sends SIGTERM before preemption; Lightning ends the run with a SystemExit of status 0."""
    args = ["--data.data_dir", str(data_dir), *LONG]
    run, err, last = interrupt_mid_run(args, tmp_path, signal.SIGTERM)
    assert run.returncode == 2 and "Traceback" not in err
    assert re.fullmatch(
        r"error: stopped by SIGTERM in epoch \d+ of 40; the epochs before it are in last.ckpt: "
        r"resume with --ckpt_path last",
        err.strip().splitlines()[-1],
    )
    assert not (tmp_path / "lightning_logs" / "version_0" / "metrics.json").exists()  # it did not finish
    resumed = run_module("mnist_lightning.fit", "--ckpt_path", "last", cwd=tmp_path)
    assert "epoch 40/40" in resumed.stdout


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_run_resumes(data_dir, tmp_path):
    args = ["--data.data_dir", str(data_dir), *LONG]
    run, err, _ = interrupt_mid_run(args, tmp_path, signal.SIGINT)
    assert run.returncode == 1 and "Detected KeyboardInterrupt" in err and "Traceback" not in err
    resumed = run_module("mnist_lightning.fit", *args, "--ckpt_path", "last", cwd=tmp_path)
    assert "epoch 40/40" in resumed.stdout
