"""A throwaway PostgreSQL server on a free loopback port, for the sweep's tests and benchmarks/sweep_postgres.py.

Debian's postgresql package keeps initdb and pg_ctl in /usr/lib/postgresql/VERSION/bin, off PATH. The server
refuses to run as root, so as root it runs as the ``postgres`` user; it listens on 127.0.0.1 only, with no
Unix socket, and asks every client for a password (scram-sha-256), as a shared server would.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER, PASSWORD, DATABASE = "sweeper", "s3cret-pw", "optuna"


def binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's newest version."""
    found = shutil.which("initdb")
    folders = [Path(found).parent] if found else [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    folders = [f for f in folders if (f / "initdb").is_file() and (f / "pg_ctl").is_file()]
    return max(folders, key=lambda f: int(f.parent.name) if f.parent.name.isdigit() else 0, default=None)


class Cluster:
    """``with Cluster() as cluster:`` a running server with USER, PASSWORD and DATABASE; ``cluster.url()``."""

    def __init__(self):
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL: initdb is neither on PATH nor in /usr/lib/postgresql/*/bin")
        self.as_user = []
        if os.geteuid() == 0:  # postgres will not run as root
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no postgres user to run the server as") from None
            self.as_user, self.uid = ["runuser", "-u", "postgres", "--"], owner.pw_uid
        self.folder = Path(tempfile.mkdtemp(prefix="sweep-pg-"))  # not pytest's tmp_path: postgres cannot enter it

    def run(self, program: str, *args: str) -> None:
        proc = subprocess.run([*self.as_user, str(self.bin / program), *args], capture_output=True, text=True)
        if proc.returncode:
            log = self.folder / "server.log"
            raise RuntimeError(f"{program} failed: {proc.stderr.strip()} {log.read_text() if log.exists() else ''}")

    def __enter__(self) -> "Cluster":
        try:
            if self.as_user:
                os.chown(self.folder, self.uid, -1)
            secret = self.folder / "password"
            secret.write_text(PASSWORD)
            if self.as_user:
                os.chown(secret, self.uid, -1)
            data = self.folder / "data"
            self.run("initdb", "-D", str(data), "-U", USER, f"--pwfile={secret}", "--auth=scram-sha-256", "-E", "UTF8")
            with socket.socket() as s:  # a free port; the few microseconds until the server binds it are a race
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            options = f"-h 127.0.0.1 -p {self.port} -k ''"
            self.run("pg_ctl", "-D", str(data), "-l", str(self.folder / "server.log"), "-o", options, "-w", "start")
            self.started = True
            import psycopg  # the sweep extra's driver

            with psycopg.connect(self.url(database="postgres"), autocommit=True) as db:
                db.execute(f"CREATE DATABASE {DATABASE}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def url(self, password: str = PASSWORD, database: str = DATABASE, driver: str = "") -> str:
        """How a user writes the server's URL: postgresql://USER:PASSWORD@HOST:PORT/DATABASE."""
        scheme = "postgresql" + (f"+{driver}" if driver else "")
        return f"{scheme}://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def __exit__(self, *exc) -> None:
        if getattr(self, "started", False):
            self.run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.folder, ignore_errors=True)
