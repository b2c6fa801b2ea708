"""Writing what the commands produce: whole or not at all, and never over what it was made from."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mnist_lightning.errors import UserError


def cause(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The ``kind`` of exception behind ``err``: itself, or one it was raised from or while handling."""
    while err is not None and not isinstance(err, kind):
        err = err.__cause__ or err.__context__
    return err


def disk_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed write: itself, or the one torch.save wraps in a RuntimeError."""
    return cause(err, OSError)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write to a temporary file beside ``path``, sync it, then rename it into place.

    A kill or a full disk at any moment leaves the old file or the new one, never a torn one, and no
    temporary file after a failure this process saw. Raises what ``write`` or the disk raised.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_output(path: Path, content: str | bytes, made_from: Path | None = None) -> None:
    """Write a command's --output file atomically, or say in one line why it cannot be written.

    ``made_from`` is the command's input (a checkpoint): an output that would replace it is refused.
    """
    if made_from is not None and path.exists() and path.resolve() == Path(made_from).resolve():
        raise UserError(f"--output {path} is the checkpoint it is made from; pass another file")
    data = content if isinstance(content, bytes) else content.encode()  # text as given: csv writes its line ends
    try:
        atomic_write(path, lambda file: file.write(data))
    except (OSError, RuntimeError) as err:
        cause = disk_error(err)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        raise UserError(
            f"cannot write {path} ({reason}); pass --output somewhere writable (any earlier file is kept)"
        ) from None
