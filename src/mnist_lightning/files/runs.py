"""Run folders: which one a run writes to, resuming a run as it was configured, and cleaning up after a
failure without ever deleting what this process did not write; checkpoints written atomically."""

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnist_lightning.errors import UserError
from mnist_lightning.files.checkpoints import resolve_checkpoint
from mnist_lightning.files.lock import LOCK
from mnist_lightning.files.outputs import atomic_write, cause, disk_error

# What a run writes into its folder; a failed run's folder holding anything else is left alone.
SLURM_JOB = "slurm_job"  # the SLURM job training the run, which its requeue looks for (training/slurm.py)
RUN_FILES = (
    *("config.yaml", "hparams.yaml", "metrics.json", "events.out.tfevents.*", "checkpoints/*.ckpt", LOCK, SLURM_JOB),
)


def resume_last(root: Path, logger, word: str) -> Path:
    """fit's ``--ckpt_path last``: the newest run's last.ckpt, unless that run has finished."""
    if word == "best":
        raise UserError(
            "fit resumes a run from its last.ckpt (--ckpt_path last); to use the best checkpoint, pass "
            "--ckpt_path best to evaluate, predict, export or serve"
        )
    last = resolve_checkpoint("last", root, logger)
    run = last.parents[1]
    if (run / "metrics.json").exists():
        if scheduler(run) == "none":
            advice = f"to train it further pass --ckpt_path {last} with a larger --trainer.max_epochs"
        else:
            advice = "its one-cycle schedule cannot be extended: start a new run with a larger --trainer.max_epochs"
        raise UserError(f"--ckpt_path last: the newest run with a last.ckpt, {run}, has finished; {advice}")
    return last


@contextlib.contextmanager
def released_on_failure(claimed: Path | None):
    """Delete the run folder this process made if what follows fails (it holds nothing worth keeping)."""
    try:
        yield
    except BaseException:
        if claimed:
            release(claimed)
        raise


@contextlib.contextmanager
def stopped_cleanly(trainer, claimed: Path | None):
    """Around ``trainer.fit`` and ``trainer.test``: a failure before the first step releases the run folder
    this process made; SIGTERM and a full disk end in one line that says how to resume."""
    try:
        yield
    except BaseException as err:
        if claimed and trainer.global_step == 0:  # it failed before training: nothing to keep
            release(claimed)
        if isinstance(err, SIGTERMException):  # a SystemExit with status 0: a requeue script would see success
            raise UserError(
                f"stopped by SIGTERM in epoch {trainer.current_epoch + 1} of {trainer.max_epochs}; the epochs "
                "before it are in last.ckpt: resume with --ckpt_path last"
            ) from None
        cause = disk_error(err)
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            # TensorBoard's events are written by a thread, and name no file: name the run instead.
            where = cause.filename or (trainer.logger.log_dir if trainer.logger else trainer.default_root_dir)
            raise UserError(
                f"the disk is full ({cause.strerror}) writing {where}; the run stopped, and its checkpoints and "
                "logs so far are kept. Free some space, then resume with --ckpt_path last"
            ) from None
        raise


def saved_config(ckpt_path: str) -> Path | None:
    """The config.yaml of the run a checkpoint belongs to (RUN/checkpoints/NAME.ckpt), if it has one."""
    ckpt = Path(ckpt_path)
    config = ckpt.parent.parent / "config.yaml"
    return config if ckpt.parent.name == "checkpoints" and config.is_file() else None


def scheduler(run: Path) -> str | None:
    import yaml  # jsonargparse's own YAML reader

    try:
        return yaml.safe_load((run / "config.yaml").read_text())["model"]["scheduler"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def version_for(root: Path, ckpt_path: str | None) -> tuple[int | None, bool]:
    """The version folder under ``root`` (``.../lightning_logs``) to log into, and whether this process made it.

    Resuming from ``<root>/version_N/checkpoints/*.ckpt`` continues in version_N, so TensorBoard shows
    one curve. A new run gets a new folder, created here with mkdir, which fails for all but one of
    several runs started at once. Only rank zero creates folders; the other ranks learn the folder
    from it through Lightning's broadcasts.
    """
    if ckpt_path is not None:
        folder = Path(ckpt_path).resolve().parent.parent
        if folder.parent == root.resolve() and folder.name.removeprefix("version_").isdigit():
            return int(folder.name.removeprefix("version_")), False
    if rank_zero_only.rank:
        return None, False
    return claim_version(root), True


def claim_version(root: Path) -> int:
    try:
        root.mkdir(parents=True, exist_ok=True)
        version = max((int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()), default=-1) + 1
        while True:
            try:
                (root / f"version_{version}").mkdir()
                return version
            except FileExistsError:
                version += 1
    except OSError as err:
        raise UserError(
            f"cannot create a run folder in {root}/ ({err.strerror}); pass --trainer.default_root_dir DIR you can write"
        ) from None


def release(folder: Path) -> None:
    """Delete the folder of a run that failed before it trained a step, if it holds only what a run writes.

    Called only for a folder this process created; anything else in it (a user's file) keeps it all.
    """
    if not folder.is_dir():
        return
    ours = {p for pattern in RUN_FILES for p in folder.glob(pattern)} | {folder / "checkpoints"}
    if all(p in ours for p in folder.rglob("*")):
        shutil.rmtree(folder)


def write_metrics(run: Path, result: dict) -> None:
    """Atomically: a resume that fails to write it keeps the earlier one."""
    text = (json.dumps(result, indent=2) + "\n").encode()
    try:
        atomic_write(run / "metrics.json", lambda file: file.write(text))
    except OSError as err:
        raise UserError(f"could not write {run}/metrics.json ({err.strerror}); the checkpoints are kept") from None


def resolved_folder(folder: Path, option: str) -> Path:
    """The folder's absolute path; a symlink loop on the way is refused naming the option."""
    try:
        return folder.resolve()
    except (RuntimeError, OSError) as err:  # pathlib raises RuntimeError for a loop
        raise UserError(
            f"{option} {folder} cannot be used: it goes through a symlink loop ({err}); pass a folder"
        ) from None


def ensure_writable(folder: Path, option: str) -> None:
    """Fail before training, not at the first checkpoint an epoch later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to {folder} ({err.strerror}); pass {option} DIR you can write") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, syncs it, then renames it into place.

    A kill at any moment leaves the old file or the new one, never a torn one. Lightning's own
    writer stages in the system temp folder and moves from there, which on another file system is a
    plain copy. A full disk keeps the old file and stops the run with one line.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
                stale.unlink(missing_ok=True)
            atomic_write(path, lambda file: torch.save(checkpoint, file))
        except (OSError, RuntimeError) as err:
            # Ctrl-C in the middle of a write reaches torch.save's caller as the RuntimeError its zip writer
            # raises on closing a torn file: it is still Ctrl-C, which Lightning stops on cleanly.
            if isinstance(err, RuntimeError) and cause(err, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            disk = disk_error(err)  # a full disk reaches torch.save's caller as a RuntimeError
            if disk is None:
                raise
            raise UserError(
                f"could not write checkpoint {path} ({disk.strerror or disk}); any earlier one is kept. "
                "Free some space or pass --trainer.default_root_dir DIR"
            ) from None
