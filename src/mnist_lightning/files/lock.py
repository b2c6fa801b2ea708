"""The run folder's lock: one process at a time writes to a run, and the lock dies with its holder.

The lock is a POSIX record lock (``fcntl.lockf``) on ``RUN/.lock``, which records ``PID HOST`` for the
message that names a live holder. The kernel releases it when the process ends, however it ends
(``kill -9``, a node that a SLURM requeue leaves), so no stale lock ever needs deleting by hand.

Why lockf and not flock: record locks are the kind NFS carries to the server (the NLM protocol for
NFSv3, the protocol itself for NFSv4), so a process on another host sharing the folder sees them; flock
on NFS is emulated with them on Linux and local-only elsewhere. A host that dies holding one is
released when its NFSv4 lease expires (90 s by default) or when NFSv3's lock daemon notices the reboot.
"""

import errno
import fcntl
import os
import socket
from pathlib import Path

from mnist_lightning.errors import UserError

LOCK = ".lock"


def lock(folder: Path) -> None:
    """Take the run folder for this process, until it exits; a folder another live process holds is
    refused, naming it.

    The file is never deleted: deleting a lock file races with a process that opened it just before.
    Not held, it is only a record of the last holder. Record locks belong to the process, so the same
    process taking it again (tests resume in-process) succeeds, and closing any descriptor of the file
    in this process would drop it: nothing here reads the file while holding it.
    """
    path, me = folder / LOCK, f"{os.getpid()} {socket.gethostname()}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot write to {folder} ({err.strerror}); pass --trainer.default_root_dir DIR") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.read(fd, 256).decode(errors="replace").strip()
        os.close(fd)
        if err.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK: a file system without locks
            raise UserError(
                f"cannot lock {path} ({err.strerror}): the file system has no locks; pass "
                "--trainer.default_root_dir DIR on a local disk or an NFS mount with locking"
            ) from None
        pid, _, host = holder.partition(" ")
        who = f"process {pid or '?'} on {host or '?'}"
        raise UserError(f"{folder} is in use by {who}: wait for that run to end") from None
    os.ftruncate(fd, 0)
    os.write(fd, me.encode())
    # The descriptor stays open for the life of the process: closing it would release the lock.
