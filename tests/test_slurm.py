"""SLURM's requeue (sbatch --requeue --signal=SIGUSR1@90) resumes the same run, bit-identically, as a resume
from last.ckpt does; tried with a stand-in scontrol and SLURM's environment variables."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_module
from mnist_lightning.errors import UserError
from mnist_lightning.fit import cli_main
from mnist_lightning.training import slurm

# What SLURM sets in a one-task batch job that Lightning takes for SLURM (not named bash or interactive).
SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "mnist",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}

# Many short epochs, so that the signal lands mid-run (as in test_reliability's kill -9 resume).
LONG = [*FAST, "--trainer.max_epochs", "40", "--data.batch_size", "8"]


def scontrol(folder: Path) -> tuple[Path, Path]:
    """A stand-in for scontrol that records its arguments, then does what SLURM does to a requeued job's
    processes: SIGTERM (its parent, the fit that called it)."""
    folder.mkdir()
    record, program = folder / "scontrol.ran", folder / "scontrol"
    program.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\nkill -TERM $PPID\n')
    program.chmod(0o755)
    return folder, record


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_a_requeued_job_resumes_its_run_in_place_bit_identically(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "mnist_lightning.fit", "--data.data_dir", str(data_dir), *LONG]
    (tmp_path / "whole").mkdir()
    run_module(*cmd[2:], cwd=tmp_path / "whole")  # not under SLURM, never interrupted
    reference = weights(tmp_path / "whole" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")

    bin_dir, record = scontrol(tmp_path / "bin")
    env = {**os.environ, **SLURM, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONWARNINGS": "ignore"}
    job = tmp_path / "job"
    job.mkdir()
    first = subprocess.Popen(cmd, cwd=job, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = job / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    while not last.exists() and first.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)
    first.send_signal(signal.SIGUSR1)  # SLURM's warning, 90 s before the time limit
    _, err = first.communicate(timeout=120)
    assert record.read_text() == "requeue 4242\n"
    assert not list(job.rglob("hpc_ckpt_*")), list(job.iterdir())  # Lightning's mid-epoch one, outside the run
    interrupted_at = torch.load(last, weights_only=True)["epoch"]
    assert interrupted_at < 39  # it really was cut short
    assert f"SLURM job 4242 requeued on SIGUSR1: it resumes {last.parents[1]} from its last.ckpt" in err
    assert first.returncode == 2 and "error: stopped by SIGTERM in epoch" in err, err

    # The requeued job: the same command, the same environment.
    second = subprocess.run(cmd, cwd=job, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "SLURM job 4242 was requeued: it resumes its run" in second.stderr + second.stdout
    assert f"epoch {interrupted_at + 2}/40" in second.stdout and "epoch 1/40" not in second.stdout
    assert [p.name for p in (job / "lightning_logs").iterdir()] == ["version_0"]  # one run, in one folder
    assert not list(job.rglob("hpc_ckpt_*"))
    assert record.read_text() == "requeue 4242\n"  # requeued once
    final = weights(last)
    assert final.keys() == reference.keys()
    differ = max(float((final[k] - reference[k]).abs().max()) for k in reference)
    print(f"\nrequeued at epoch {interrupted_at + 2}/40; {len(reference)} tensors, largest difference {differ}")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_job_finds_its_own_unfinished_run_only(tmp_path, monkeypatch):
    root = tmp_path / "lightning_logs"
    for version, job, finished in ((0, "4242", True), (1, "4242", False), (2, "77", False), (3, "4242", None)):
        run = root / f"version_{version}"
        (run / "checkpoints").mkdir(parents=True)
        slurm.record(run, job)
        if finished is not None:
            (run / "checkpoints" / "last.ckpt").write_bytes(b"")
        if finished:
            (run / "metrics.json").write_text("{}")
    assert slurm.requeued_checkpoint(root, "77") == str(root / "version_2" / "checkpoints" / "last.ckpt")
    assert slurm.requeued_checkpoint(root, "5") is None
    # The job's newest run, version_3, was requeued before its first last.ckpt: a new run.
    assert slurm.requeued_checkpoint(root, "4242") is None
    (root / "version_3" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert slurm.requeued_checkpoint(root, "4242") == str(root / "version_3" / "checkpoints" / "last.ckpt")


def test_the_job_id_is_lightnings_and_none_outside_slurm(monkeypatch):
    for name in [*SLURM, "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"]:
        monkeypatch.delenv(name, raising=False)
    assert slurm.job_id() is None
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    assert slurm.job_id() == "4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert slurm.job_id() == "4240_2"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # srun --pty bash: Lightning does not take it for SLURM
    assert slurm.job_id() is None


def test_an_hpc_checkpoint_lightning_would_restore_into_a_new_run_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")  # left by Lightning's own requeue
    with pytest.raises(UserError, match=r"hpc_ckpt_1.ckpt is a mid-epoch checkpoint of Lightning's SLURM requeue"):
        cli_main(["--data.data_dir", str(data_dir), *FAST])
    assert not (tmp_path / "lightning_logs").exists()
