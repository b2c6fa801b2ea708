"""Serve a checkpoint over HTTP: ``python -m mnist_lightning.serve --ckpt_path PATH [--port 8000]``.

``GET /`` is a page to draw digits on, ``POST /predict`` reads one image file (the raw body or a
multipart upload) and answers JSON, ``GET /health`` says the server is ready. Needs the serve extra:
``pip install -e ".[serve]"``.
"""

import argparse
import json
import os
import socket

from mnist_lightning.errors import UserError, run_main
from mnist_lightning.files.checkpoints import load_checkpoint, resolve_checkpoint

KEY_VARIABLE = "MNIST_API_KEY"


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


def cli_main(args: list[str] | None = None) -> None:
    """Check the checkpoint, open the port, print the URL and serve until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m mnist_lightning.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by fit, or 'last' (newest run's best)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 opens it to the network")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    parser.add_argument("--workers", type=int, default=1, help="server processes sharing the port")
    parser.add_argument("--api_key", default=os.environ.get(KEY_VARIABLE), help=f"/predict's key; or ${KEY_VARIABLE}")
    parser.add_argument("--max_bytes", type=int, default=10_000_000, help="largest upload accepted, in bytes")
    parser.add_argument(
        "--cors_origins",
        nargs="+",
        default=[],
        metavar="ORIGIN",
        help="other web pages (https://example.com) whose scripts may call the API from a browser; '*': any",
    )
    parser.add_argument(
        "--allowed_hosts",
        nargs="+",
        default=[],
        metavar="NAME",
        help="Host header names answered besides those of --host (the name a proxy forwards); '*': any",
    )
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    config = parser.parse_args(args)
    if config.workers < 1:
        raise UserError(f"--workers must be 1 or more, got {config.workers}")
    if config.max_bytes < 1:
        raise UserError(f"--max_bytes must be positive, got {config.max_bytes}")
    if not 0 <= config.port <= 65535:
        raise UserError(f"--port must be within 0-65535 (0: any free port), got {config.port}")
    try:
        import uvicorn
        from uvicorn.supervisors import Multiprocess

        from mnist_lightning.serve.app import SETTINGS_VARIABLE, create_app, host_names
    except ModuleNotFoundError as err:
        if err.name not in ("fastapi", "starlette", "uvicorn", "python_multipart"):
            raise
        raise UserError(f"serving needs {err.name}, not installed: pip install 'mnist-lightning[serve]'") from None
    ckpt_path = str(resolve_checkpoint(config.ckpt_path))
    net, (mean, std), _ = load_checkpoint(ckpt_path)
    sock = listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    print(f"serving {ckpt_path} at http://{f'[{host}]' if ':' in host else host}:{port}/", flush=True)
    settings = {
        "ckpt_path": str(ckpt_path),
        "api_key": config.api_key or None,
        "max_bytes": config.max_bytes,
        "hosts": sorted(host_names(config.host) | {name.lower() for name in config.allowed_hosts}),
        "cors_origins": config.cors_origins,
    }
    # No line per request (errors and tracebacks are still logged). The plain asyncio loop: with uvloop, p99
    # at 32 connections was 38-240 ms in six runs here, with asyncio 24-46 ms in six, at about the same
    # requests/s. httptools (in the serve extra) served about a fifth more requests/s than h11.
    options = {"log_level": "warning", "access_log": False, "loop": "asyncio", "workers": config.workers}
    if config.workers == 1:
        app = create_app(
            net,
            mean,
            std,
            api_key=settings["api_key"],
            max_bytes=config.max_bytes,
            hosts=set(settings["hosts"]),
            cors_origins=settings["cors_origins"],
        )
        uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])
    else:
        # Each worker is a fresh process that loads the checkpoint itself, from these settings.
        os.environ[SETTINGS_VARIABLE] = json.dumps(settings)
        Multiprocess(
            uvicorn.Config("mnist_lightning.serve.app:from_environment", factory=True, **options), [sock]
        ).run()


def main() -> None:
    run_main(cli_main)
