"""SLURM's requeue, kept inside the run: the requeued job resumes its run folder from last.ckpt.

With ``sbatch --requeue --signal=SIGUSR1@90``, SLURM warns a job 90 s before its time limit. Lightning's
own answer (``SLURMEnvironment(auto_requeue=True)``) saves a mid-epoch ``hpc_ckpt_N.ckpt`` in the working
directory and requeues; the requeued job restores it mid-epoch into a new ``version_N``: the curves and
checkpoints split over two folders, and a mid-epoch restore replays other batches than an uninterrupted run.

fit turns that off and does this instead: on SIGUSR1 it requeues the job at once (``scontrol requeue``,
which ends this process with SIGTERM, as Lightning's does); each run folder records the job that trains
it (``RUN/slurm_job``), and the requeued job, the same command with the same ``SLURM_JOB_ID``, resumes
that run from its ``last.ckpt``, the epoch boundary that ``--ckpt_path last`` resumes from. The epoch
in progress is redone, and the finished run is bit-identical to one never interrupted.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_info

from mnist_lightning.errors import UserError
from mnist_lightning.files.runs import SLURM_JOB


def job_id() -> str | None:
    """The id ``scontrol requeue`` takes (an array task's is JOB_TASK), as Lightning names it; None outside
    a SLURM job, or in one that Lightning does not take for SLURM (an interactive one)."""
    if not SLURMEnvironment.detect():
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def plugins() -> list:
    """Lightning's SLURM environment without its own requeue, in a SLURM job; SlurmRequeue does it."""
    return [SLURMEnvironment(auto_requeue=False)] if job_id() else []


def requeued_checkpoint(root: Path, job: str) -> str | None:
    """The last.ckpt of the run this job trained before it was requeued; None on the job's first start.

    ``root`` is the default logger's ``lightning_logs``. A run of the job with no last.ckpt yet (requeued
    in its first epoch) or one that has finished leaves this start to begin a new run.
    """
    mine = [p.parent for p in root.glob(f"version_*/{SLURM_JOB}") if p.read_text().strip() == job]
    mine = [run for run in mine if run.name.removeprefix("version_").isdigit()]
    if not mine:
        return None
    run = max(mine, key=lambda run: int(run.name.removeprefix("version_")))
    last = run / "checkpoints" / "last.ckpt"
    if (run / "metrics.json").is_file() or not last.is_file():
        rank_zero_info(f"SLURM job {job} started again; its run {run} has finished or has no last.ckpt: a new run")
        return None
    rank_zero_info(f"SLURM job {job} was requeued: it resumes its run, {run}")
    return str(last)


def refuse_lightnings_checkpoint(root: Path) -> None:
    """An hpc_ckpt_N.ckpt in the root, which Lightning's own requeue wrote (before fit turned it off), would be
    restored by Lightning into a new run, mid-epoch, whenever a SLURM job starts a fit without --ckpt_path."""
    found = sorted(root.glob("hpc_ckpt_*.ckpt"))
    if found:
        raise UserError(
            f"{found[-1]} is a mid-epoch checkpoint of Lightning's SLURM requeue, which Lightning would restore "
            "into a new run: resume its run with --ckpt_path, or move it out of the way"
        )


def record(run: Path, job: str) -> None:
    """Say which job trains the run; the latest to resume it is the one whose requeue finds it."""
    (run / SLURM_JOB).write_text(job + "\n")


class SlurmRequeue(Callback):
    """In a SLURM job, requeues it on SLURM's warning signal (SIGUSR1); the requeued job resumes the run.

    Every process of the job gets the signal; rank zero requeues. The handler is ours from setup to
    teardown (or an exception), whatever the stage: a requeue during the final test resumes into it.
    """

    def __init__(self):
        self.previous, self.trainer = None, None

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        if job_id() is not None:
            self.trainer = trainer
            self.previous = signal.signal(signal.SIGUSR1, self.requeue)

    def teardown(self, trainer: Trainer, pl_module, stage: str) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGUSR1, self.previous)
            self.previous = None

    def on_exception(self, trainer: Trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "")

    def requeue(self, signum, frame) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # once: SLURM may signal again before it stops us
        if not self.trainer.is_global_zero:
            return
        # Not trainer.log_dir: under DDP it is a collective, and only this rank is here.
        job, run = job_id(), self.trainer.logger.log_dir if self.trainer.logger else "the run"
        try:
            status = subprocess.call(["scontrol", "requeue", job])
        except OSError as err:
            status = err.strerror
        if status == 0:
            print(
                f"SLURM job {job} requeued on SIGUSR1: it resumes {run} from its last.ckpt, "
                f"redoing epoch {self.trainer.current_epoch + 1}",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"warning: scontrol requeue {job} failed ({status}); resume the run later with --ckpt_path last",
                file=sys.stderr,
                flush=True,
            )
