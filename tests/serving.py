"""A real ``python -m mnist_lightning.serve`` process on a free loopback port, for the server's tests."""

import asyncio
import concurrent.futures
import http.client
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path


class Server:
    """Started with ``--port 0``: the server binds a free port itself and prints its URL, so no port race;
    and ``--drain_seconds 0`` unless given, so that stopping it takes no drain."""

    def __init__(self, *args: str, cwd: Path, log: Path, env: dict | None = None, timeout: float = 60):
        self.log = log
        with open(log, "w") as stderr:  # a file, not a pipe: tracebacks cannot fill a buffer and block it
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mnist_lightning.serve", "--port", "0", "--drain_seconds", "0", *args],
                cwd=cwd,
                env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("serving "):
            self.stop()
            raise AssertionError(f"the server did not start: {line!r}\n{log.read_text()}")
        self.first_line = line.strip()
        self.url = line.split(" at ")[-1].strip()
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while self.request("GET", "/health")[0] != 200:  # --workers N: until a worker answers
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"the server never became healthy\n{log.read_text()}")
            time.sleep(0.1)

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict | str]:
        """Status and the JSON answer (the text if it is not JSON); a refused connection is status 0."""
        connection = self.connect()
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            text = response.read().decode()
        except ConnectionRefusedError:
            return 0, ""
        finally:
            connection.close()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    def post(self, body: bytes, content_type: str = "image/png", headers: dict | None = None) -> tuple[int, dict]:
        return self.request("POST", "/predict", body, {"Content-Type": content_type, **(headers or {})})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def run_coroutine(coroutine):
    """``asyncio.run`` in a thread of its own: Playwright's sync API, once a browser test has started it,
    keeps an event loop running in the main thread for the rest of the session."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
