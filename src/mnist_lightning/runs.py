"""Run folders: which ``lightning_logs/version_N`` a run writes to, and checks that it can."""

import os
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from mnist_lightning.errors import UserError


def resolve_resume(root: Path, ckpt_path: str | None) -> tuple[str | None, int | None]:
    """The checkpoint to resume from and the version folder to log into.

    Resuming from ``<root>/version_N/checkpoints/*.ckpt`` continues in version_N, so TensorBoard
    shows one curve. A new run gets a new folder, created here with mkdir, which fails for all but
    one of several runs started at once. Only rank zero creates folders; other ranks learn the
    folder from it through Lightning's broadcasts.
    """
    if ckpt_path == "last":
        found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"--ckpt_path last: no run in {root}/ has a checkpoints/last.ckpt to resume from")
        if (found[-1].parents[1] / "metrics.json").exists():
            raise UserError(
                f"--ckpt_path last: the newest run with a last.ckpt, {found[-1].parents[1]}, has finished; "
                "to train it further pass its checkpoint path explicitly with a larger --trainer.max_epochs"
            )
        ckpt_path = str(found[-1])
    if ckpt_path is not None:
        folder = Path(ckpt_path).resolve().parent.parent
        if folder.parent == root.resolve() and folder.name.removeprefix("version_").isdigit():
            return ckpt_path, int(folder.name.removeprefix("version_"))
        return ckpt_path, None if rank_zero_only.rank else claim_version(root)
    return None, None if rank_zero_only.rank else claim_version(root)


def ensure_writable(folder: Path, option: str) -> None:
    """Fail before training, not at the first checkpoint an epoch later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to {folder} ({err.strerror}); pass {option} DIR you can write") from None


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
