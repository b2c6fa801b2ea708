"""Two servers behind nginx, configured as docs/serving.md says: one is restarted under load and no client
sees a failure; a photo over nginx's default 1 MB body limit reaches the servers."""

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from serving import Server
from test_serve import bar, encoded

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
NAME = "digits.example.com"  # the name the doc's nginx serves, forwarded to the servers as Host

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install -y nginx)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def documented_config(root: Path, port: int, upstreams: list[int]) -> Path:
    """The doc's nginx block, on loopback ports, with every path nginx writes under ``root``."""
    text = DOC.read_text()
    block = re.search(r"```nginx\n(.*?)```", text[text.index("## Running N servers") :], re.S).group(1)
    block = block.replace("listen 80;", f"listen 127.0.0.1:{port};")
    documented = re.findall(r"server 127\.0\.0\.1:(\d+)", block)
    assert len(documented) == len(upstreams), documented
    for old, new in zip(documented, upstreams, strict=True):
        block = block.replace(f"127.0.0.1:{old} ", f"127.0.0.1:{new} ")
    temp = "\n".join(
        f"    {kind}_temp_path {root}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;" if os.geteuid() == 0 else ""  # as root, workers would otherwise run as nobody
    config = root / "nginx.conf"
    config.write_text(
        f"daemon off;\n{user}\npid {root}/nginx.pid;\nerror_log {root}/error.log warn;\nworker_processes 1;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n    access_log off;\n{temp}\n{block}}}\n"
    )
    return config


@pytest.fixture
def balanced(trained_ckpt, tmp_path):
    """Two servers and nginx in front of them: (nginx's port, the servers, a function restarting one)."""
    ports = [free_port(), free_port()]
    args = ["--ckpt_path", str(trained_ckpt), "--allowed_hosts", NAME, "--drain_seconds", "1"]
    servers = [Server(*args, "--port", str(p), cwd=tmp_path, log=tmp_path / f"server{p}.log") for p in ports]
    port = free_port()
    config = documented_config(tmp_path, port, ports)
    nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")])
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline and nginx.poll() is None, (tmp_path / "error.log").read_text()
            time.sleep(0.1)

    def restart(i: int) -> None:
        servers[i].proc.send_signal(signal.SIGTERM)
        servers[i].proc.wait(30)
        servers[i].stop()
        servers[i] = Server(*args, "--port", str(ports[i]), cwd=tmp_path, log=tmp_path / f"again{ports[i]}.log")

    yield port, servers, restart
    nginx.send_signal(signal.SIGQUIT)  # nginx's graceful stop
    nginx.wait(30)
    for server in servers:
        server.stop()


def through(port: int, body: bytes, content_type: str = "image/png") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/predict", body=body, headers={"Host": NAME, "Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_restarting_one_server_under_load_fails_no_request(balanced):
    port, servers, restart = balanced
    body, results, done = encoded(bar(5)), [], threading.Event()

    def client() -> None:
        while not done.is_set():
            try:
                results.append(through(port, body))
            except OSError as err:
                results.append((repr(err), b""))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    time.sleep(1)
    restart(0)
    deadline = time.monotonic() + 30
    while not re.search(  # until nginx sends the restarted server work again, after its fail_timeout
        r'mnist_http_requests_total\{method="POST",route="/predict",status="200"\} [1-9]',
        servers[0].request("GET", "/metrics")[1],
    ):
        assert time.monotonic() < deadline, "nginx never sent the restarted server a request"
        time.sleep(0.2)
    done.set()
    for thread in clients:
        thread.join()
    failed = [(status, text[:100]) for status, text in results if status != 200 or b'"digit":5' not in text]
    assert len(results) > 50 and not failed, f"{len(failed)} of {len(results)} failed: {failed[:5]}"


def test_a_photo_over_nginxs_default_body_limit_reaches_the_server(balanced):
    port, _, _ = balanced
    photo = encoded(bar(8).resize((1000, 1000)).convert("RGB"), "BMP")
    assert 1_048_576 < len(photo) < 10_000_000  # over nginx's 1 MB default, under --max_bytes
    status, text = through(port, photo, "image/bmp")
    assert status == 200 and b'"digit"' in text, text[:200]
