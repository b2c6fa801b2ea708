"""One clear line for mistakes a user can fix; the traceback only with --verbose."""

import gc
import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """Bad input or environment, described with what to do about it."""


def usage_error(err: Exception) -> UserError:
    """A command-line parsing error as one line (jsonargparse's can span several), instead of the usage."""
    return UserError(f"{' '.join(str(err).split())} (see --help)")


def write_output(path: Path, content: str | bytes) -> None:
    """Write a command's --output file, or say in one line why it cannot be written."""
    try:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, newline="")  # as given: the csv module writes its own line ends
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror}); pass --output somewhere writable") from None


def run_main(main: Callable[[list[str]], object], args: list[str] | None = None) -> None:
    """Call ``main(args)`` and turn a UserError or OSError into ``error: ...`` on stderr and exit status 2.

    Without ``args`` (a command, about to exit) it also spares the exit Python's last search for garbage.
    """
    command_line = args is None
    args = sys.argv[1:] if command_line else list(args)
    verbose = "--verbose" in args
    args = [a for a in args if a != "--verbose"]
    try:
        main(args)
    except (UserError, OSError) as err:
        # An OSError that no code above could attribute (a disk filling up mid-run, say) still
        # reads as one line: it names the file and the reason.
        if verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if command_line:
            # At exit Python walks every object torch and Lightning made, looking for cycles to free:
            # 0.7 s of every command here. The process is ending and the OS frees its memory, so take
            # them out of that walk. atexit handlers (logger uploads, say) and module teardown still run.
            gc.freeze()
