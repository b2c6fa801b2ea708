"""Serve a checkpoint over HTTP: ``python -m mnist_lightning.serve [--ckpt_path best] [--port 8000]``.

``GET /`` is a page to draw digits on, ``POST /predict`` reads one image file (the raw body or a
multipart upload) and answers JSON, ``GET /health`` says the server is alive, ``GET /ready`` whether it
takes new work (not once SIGTERM has come), ``GET /metrics`` is for Prometheus. Needs the serve extra:
``pip install -e ".[serve]"``.
"""

import json
import os
import shutil
import socket
import sys
import tempfile

from mnist_lightning.cli import command
from mnist_lightning.errors import UserError, run_main
from mnist_lightning.files.checkpoints import load_checkpoint, resolve_checkpoint
from mnist_lightning.serve import keys


def listen(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so a taken port is one line and --port 0 can print the port it got."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say they are TCP, and with it on
        # each answer waited ~40 ms for the client's delayed ACK (22 requests/s on one connection).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port") from None
    sock.set_inheritable(True)  # the worker processes of --workers N accept on it too
    return sock


def serve(
    ckpt_path: str = "best",
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    api_key: str | None = None,
    api_key_file: str | None = None,
    max_bytes: int = 10_000_000,
    cors_origins: list[str] | None = None,
    allowed_hosts: list[str] | None = None,
    drain_seconds: float = 3.0,
    grace_seconds: float = 10.0,
    read_timeout: float = 20.0,
) -> None:
    """Serve the HTTP API and the draw-a-digit page: prints the URL once it accepts connections, then
    serves until Ctrl-C or SIGTERM.

    Args:
        ckpt_path: best or last (the newest run's under ./lightning_logs), or a checkpoint written by fit
        host: address to bind; 0.0.0.0 opens it to the network
        port: port to listen on; 0 picks a free one
        workers: server processes sharing the port
        api_key: the key POST /predict needs in its X-API-Key header (default: $MNIST_API_KEY, else none);
            ps shows it to every user: prefer $MNIST_API_KEY or --api_key_file
        api_key_file: a file holding the key
        max_bytes: largest upload accepted, in bytes
        cors_origins: other web pages (https://example.com) whose scripts may call the API from a browser; '*': any
        allowed_hosts: Host header names answered besides those of --host (the name a proxy forwards); '*': any
        drain_seconds: after SIGTERM, how long to go on serving while GET /ready says 503
        grace_seconds: then, how long requests in flight may take before they are cut off
        read_timeout: seconds a request may take to arrive, plus 1 s per 50 kB of body
    """
    for name, value in {"drain_seconds": drain_seconds, "grace_seconds": grace_seconds}.items():
        if not 0 <= value < float("inf"):
            raise UserError(f"--{name} must be 0 or more seconds, got {value}")
    if workers < 1:
        raise UserError(f"--workers must be 1 or more, got {workers}")
    if max_bytes < 1:
        raise UserError(f"--max_bytes must be positive, got {max_bytes}")
    if not 0 < read_timeout < float("inf"):
        raise UserError(f"--read_timeout must be positive, got {read_timeout}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be within 0-65535 (0: any free port), got {port}")
    key = keys.api_key(api_key, api_key_file)
    if api_key is not None and keys.on_command_line(sys.argv):  # what ps shows: this process's own arguments
        print(
            "warning: an --api_key on the command line shows in ps; use $MNIST_API_KEY or --api_key_file",
            file=sys.stderr,
        )
    if workers == 1:  # one process keeps its metrics in memory; prometheus_client picks its mode on import
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        # What serving needs, imported first so that a missing one is named whatever was imported before.
        import httptools  # noqa: F401  (uvicorn's protocol for it is the one serve.protocol bounds)
        import uvicorn  # noqa: F401

        from mnist_lightning.serve.app import SETTINGS_VARIABLE, create_app
        from mnist_lightning.serve.guard import host_names
        from mnist_lightning.serve.lifecycle import Server, Supervisor
        from mnist_lightning.serve.metrics import DIR_VARIABLE
        from mnist_lightning.serve.protocol import ServeConfig
    except ModuleNotFoundError as err:
        if err.name not in ("fastapi", "starlette", "uvicorn", "python_multipart", "httptools", "prometheus_client"):
            raise
        raise UserError(f"serving needs {err.name}, not installed: pip install 'mnist-lightning[serve]'") from None
    ckpt_path = str(resolve_checkpoint(ckpt_path))
    # --workers N: a worker that dies is started again, and loads the checkpoint again. Each loads a
    # private copy, which nothing else writes, so a run that replaces the file meanwhile cannot make two
    # workers serve two models. The folder goes with the object: when serve returns, or the process exits.
    private = tempfile.TemporaryDirectory(prefix="mnist-serve-") if workers > 1 else None
    served = shutil.copyfile(ckpt_path, os.path.join(private.name, "served.ckpt")) if private else ckpt_path
    net, (mean, std), saved = load_checkpoint(served)
    sock = listen(host, port)
    bound, port = sock.getsockname()[:2]

    def announce() -> None:
        print(f"serving {ckpt_path} at http://{f'[{bound}]' if ':' in bound else bound}:{port}/", flush=True)

    settings = {
        "ckpt_path": served,
        "api_key": key,
        "max_bytes": max_bytes,
        "hosts": sorted(host_names(host) | {name.lower() for name in allowed_hosts or []}),
        "cors_origins": cors_origins or [],
        "drain_seconds": drain_seconds,
    }
    # No line per request (errors and tracebacks are still logged). The plain asyncio loop: with uvloop,
    # p99 at 32 connections was 38-240 ms in six runs here, with asyncio 24-46 ms in six, at about the same
    # requests/s. httptools (in the serve extra) served about a fifth more requests/s than h11.
    options = {"log_level": "warning", "access_log": False, "loop": "asyncio", "workers": workers}
    options |= {"timeout_graceful_shutdown": grace_seconds, "read_timeout": read_timeout}
    if workers == 1:
        app = create_app(
            net,
            mean,
            std,
            api_key=key,
            max_bytes=max_bytes,
            hosts=set(settings["hosts"]),
            cors_origins=settings["cors_origins"],
            temperature=saved["temperature"],
            drain_seconds=drain_seconds,
        )
        Server(ServeConfig(app, **options), announce).run(sockets=[sock])
    else:
        # Each worker is a fresh process that builds its app from these settings, and counts its
        # requests in files under the private folder, which every worker's /metrics adds up.
        os.environ[SETTINGS_VARIABLE] = json.dumps(settings)
        os.environ[DIR_VARIABLE] = os.path.join(private.name, "metrics")
        os.mkdir(os.environ[DIR_VARIABLE])
        config = ServeConfig("mnist_lightning.serve.app:from_environment", factory=True, **options)
        Supervisor(config, [sock], announce).run()


def cli_main(args: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    command(serve, args, "serve")


def main() -> None:
    run_main(cli_main)
