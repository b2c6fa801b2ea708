"""A run folder is held by one live process at a time, and its lock dies with its holder, on any host."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import FAST, run_module
from mnist_lightning.errors import UserError
from mnist_lightning.files.lock import lock
from mnist_lightning.fit import cli_main

HOLD = (
    "import sys, time; from pathlib import Path; from mnist_lightning.files.lock import lock; "
    "lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
)


def hold(folder):
    """Another process that takes the folder's lock and keeps it until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def kill(holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_a_live_holder_is_refused_by_pid_and_host_and_its_death_frees_the_lock(tmp_path):
    holder = hold(tmp_path)
    try:
        assert (tmp_path / ".lock").read_text() == f"{holder.pid} {socket.gethostname()}"
        with pytest.raises(UserError, match=f"^{tmp_path} is in use by process {holder.pid} on {socket.gethostname()}"):
            lock(tmp_path)
    finally:
        kill(holder)  # its lock goes with it; the file, naming it, stays
    lock(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()} {socket.gethostname()}"


def test_a_lock_file_left_by_a_process_on_another_host_does_not_block(tmp_path):
    # What a job killed on another node leaves behind: a PID that may even run here, another host's name.
    (tmp_path / ".lock").write_text(f"{os.getppid()} node-17.cluster")
    lock(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()} {socket.gethostname()}"


@pytest.fixture
def unfinished(data_dir, tmp_path, monkeypatch):
    """A 2-epoch run in tmp_path/lightning_logs/version_0, stopped in its final test (no metrics.json).

    Made by another process: a run's process holds its lock until it exits.
    """
    monkeypatch.chdir(tmp_path)
    run_module("mnist_lightning.fit", "--data.data_dir", str(data_dir), *FAST, cwd=tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    (run / "metrics.json").unlink()
    return run


def resume(data_dir):
    return cli_main(["--data.data_dir", str(data_dir), *FAST, "--ckpt_path", "last"])


def snapshot(folder):
    # Not .lock: reading it here would close a descriptor of it, which drops this process's own lock.
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_a_run_held_by_a_live_process_is_refused_and_resumes_once_it_is_killed(unfinished, data_dir):
    holder = hold(unfinished)
    try:
        before = snapshot(unfinished.parent)
        with pytest.raises(UserError, match=f"version_0 is in use by process {holder.pid} on {socket.gethostname()}"):
            resume(data_dir)
        assert snapshot(unfinished.parent) == before
    finally:
        kill(holder)  # as kill -9 would, or a node that dies
    resume(data_dir)
    assert (unfinished / "metrics.json").is_file()


@pytest.mark.slow
def test_a_stale_lock_from_another_host_does_not_block_a_resume(unfinished, data_dir):
    (unfinished / ".lock").write_text("4242 node-17.cluster")
    resume(data_dir)
    assert (unfinished / "metrics.json").is_file()
