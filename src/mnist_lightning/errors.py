"""One clear line for mistakes a user can fix; the traceback only with --verbose."""

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input or environment, described with what to do about it."""


class QuietPipe:
    """stdout that outlives its reader: ``predict ... | head -2`` closes the pipe, and the command must still
    finish its work and write its --output file. After the first broken pipe, output goes to /dev/null."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.closed_by_reader()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.closed_by_reader()

    def closed_by_reader(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # what is still buffered drains there too
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run_main(main: Callable[[list[str]], object], args: list[str] | None = None) -> None:
    """Call ``main(args)`` and turn a UserError or OSError into ``error: ...`` on stderr and exit status 2;
    with the process's threads set by ``cli.threads`` first.

    stdout survives a reader that goes away, and prints file names that are not UTF-8 as their bytes.
    """
    if hasattr(sys.stdout, "reconfigure") and not isinstance(sys.stdout, QuietPipe):
        sys.stdout.reconfigure(errors="surrogateescape")
        sys.stdout = QuietPipe(sys.stdout)
    from mnist_lightning.cli import threads  # here: cli imports this module

    threads()  # every command's process, DDP's and the sweep's workers too
    args = sys.argv[1:] if args is None else list(args)
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
