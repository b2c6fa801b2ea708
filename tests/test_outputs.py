"""Outputs are written whole or not at all, never over their input, and a full disk is one line."""

import errno
import io
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_module
from mnist_lightning import evaluate, export
from mnist_lightning.errors import UserError
from mnist_lightning.files.outputs import atomic_write, write_output
from mnist_lightning.files.runs import AtomicCheckpointIO, write_metrics


def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "preds.json"
    write_output(out, "[1, 2, 3]")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"cannot write .*preds.json \(No space left on device\); pass --output"):
        write_output(out, "[4, 5, 6]")
    assert out.read_text() == "[1, 2, 3]" and [p.name for p in tmp_path.iterdir()] == ["preds.json"]


def test_a_full_disk_inside_torch_save_is_one_line(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError chained from the OSError; the writer looks through it."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def save(obj, file):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as err:
            raise RuntimeError(
                "[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file"
            ) from err

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError, match=r"No space left on device\); any earlier one is kept"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == [
        target.name
    ]


def test_ctrl_c_inside_torch_save_is_still_ctrl_c(tmp_path, monkeypatch):
    """Ctrl-C in the middle of a write tears the zip torch.save is writing, and its writer then raises a
    RuntimeError on closing it ("unexpected pos"), a traceback where Lightning would have stopped cleanly."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    save = torch.save

    class Interrupted(io.RawIOBase):  # the file as Ctrl-C leaves it: the third write half done
        def __init__(self, file):
            self.file, self.writes = file, 0

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            self.writes += 1
            if self.writes == 3:
                self.file.write(bytes(data)[: len(data) // 2])
                raise KeyboardInterrupt
            return self.file.write(data)

    monkeypatch.setattr(torch, "save", lambda obj, file: save(obj, Interrupted(file)))
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(1000)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == [
        target.name
    ]


def test_an_error_that_is_not_the_disk_is_not_called_one(tmp_path):
    def broken(file):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        atomic_write(tmp_path / "x", broken)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["export", "evaluate"])
def test_an_output_that_is_the_checkpoint_is_refused(command, trained_ckpt, tmp_path):
    ckpt = Path(shutil.copy(trained_ckpt, tmp_path / "model.ckpt"))
    before = ckpt.read_bytes()
    args = {"export": ["--format", "onnx"], "evaluate": []}[command]
    main = {"export": export.cli_main, "evaluate": evaluate.cli_main}[command]
    with pytest.raises(UserError, match=r"--output .*model.ckpt is the checkpoint it is made from"):
        main(["--ckpt_path", str(ckpt), *args, "--output", str(ckpt)])
    assert ckpt.read_bytes() == before


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, mounted for the test: a real full disk, not an injected error."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_keeps_the_earlier_checkpoint_and_output(small_disk):
    ckpt = small_disk / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, ckpt)
    with pytest.raises(UserError, match=r"could not write checkpoint .*No space left on device"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(2_000_000)}, ckpt)  # 8 MB on a 1 MiB disk
    assert torch.load(ckpt, weights_only=True)["w"].shape == (1000,)
    out = small_disk / "preds.json"
    write_output(out, "[]")
    with pytest.raises(UserError, match=r"cannot write .*preds.json \(No space left on device\)"):
        write_output(out, "x" * 3_000_000)
    assert out.read_text() == "[]" and sorted(p.name for p in small_disk.iterdir()) == ["last.ckpt", "preds.json"]


def fill(disk: Path) -> None:
    """Take every free byte of the disk."""
    with open(disk / "filler", "wb") as file:
        try:
            while True:
                file.write(bytes(65536))
                file.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_a_real_full_disk_keeps_the_earlier_metrics_and_command_outputs(small_disk, trained_ckpt):
    write_metrics(small_disk, {"test/acc": 0.9})
    (small_disk / "eval.json").write_text("{}")
    fill(small_disk)
    with pytest.raises(UserError, match=r"could not write .*metrics.json \(No space left on device\); the checkpoints"):
        write_metrics(small_disk, {"test/acc": 0.95, "padding": "x" * 10_000})
    for main, args in ((evaluate.cli_main, []), (export.cli_main, ["--format", "onnx"])):
        out = small_disk / ("eval.json" if main is evaluate.cli_main else "model.onnx")
        with pytest.raises(UserError, match=rf"cannot write .*{out.name} \(No space left on device\); pass --output"):
            main(["--ckpt_path", str(trained_ckpt), *args, "--output", str(out)])
    assert json.loads((small_disk / "metrics.json").read_text()) == {"test/acc": 0.9}
    assert (small_disk / "eval.json").read_text() == "{}"
    assert sorted(p.name for p in small_disk.iterdir()) == ["eval.json", "filler", "metrics.json"]


@pytest.mark.slow
def test_a_real_full_disk_under_the_tensorboard_events_is_one_line(small_disk, data_dir):
    (small_disk / "filler").write_bytes(bytes(1024 * 1024 - 24 * 1024))  # 24 KiB left: a few events fit
    args = ["--data.data_dir", str(data_dir), *FAST, "--trainer.enable_checkpointing", "false"]
    proc = run_module(
        "mnist_lightning.fit", *args, "--trainer.default_root_dir", str(small_disk), cwd=small_disk, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: the disk is full (No space left on device) writing {small_disk}/lightning_logs/version_0")
    )
    assert "Free some space, then resume with --ckpt_path last" in proc.stderr
