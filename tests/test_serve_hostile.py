"""Hostile and careless requests against a real server: each gets its JSON answer, whatever the client, and
the server goes on answering with nothing in its log."""

import asyncio
import http.client
import itertools
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from fastapi.responses import JSONResponse

from mnist_lightning.serve.uploads import LingeringClose
from serving import Server
from test_serve import bar, encoded

LIMIT = 10_000_000  # the server's default --max_bytes
OVER = 17_000_000  # the 17 MB photo: over the limit, and more than the kernel buffers between two sockets


@pytest.fixture(scope="module")
def server(trained_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    running = Server("--ckpt_path", str(trained_ckpt), cwd=root, log=root / "stderr.log")
    yield running
    running.stop()


# uvicorn answers malformed HTTP itself, before the app sees it, and logs this warning for each.
UVICORN_400 = "WARNING:  Invalid HTTP request received."


@pytest.fixture
def mark(server) -> int:
    """Where the server's log ends before a test: what comes after is the test's."""
    return server.log.stat().st_size


def healthy(server: Server, mark: int) -> None:
    """The server still answers, a digit too, and has logged no traceback nor any line of the app's since."""
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    assert server.post(encoded(bar(4)))[1]["digit"] == 4
    with open(server.log, "rb") as log:
        log.seek(mark)
        lines = [line for line in log.read().decode(errors="replace").splitlines() if line != UVICORN_400]
    assert lines == [], "\n".join(lines)


def urllib_post(server: Server, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    """urllib's way: ``Connection: close``, the whole body sent before a byte of the answer is read."""
    request = urllib.request.Request(server.url.rstrip("/") + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def read_to_end(sock: socket.socket) -> tuple[int, dict, dict]:
    """The status, JSON answer and headers on a socket, then all it sends until it closes; a reset fails."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    answer = response.status, json.loads(response.read()), {k.lower(): v for k, v in response.getheaders()}
    while sock.recv(65536):  # ConnectionResetError here: the server closed with the body unread
        pass
    return answer


@pytest.mark.parametrize(
    "path, headers, status",
    [
        ("/predict", {"Content-Type": "image/png"}, 413),  # over the limit by its Content-Length
        ("/predict", {"Content-Type": "text/plain"}, 415),
        ("/predict", {"Content-Type": "image/png", "Origin": "https://evil.example"}, 403),
        ("/nowhere", {"Content-Type": "image/png"}, 404),
    ],
)
def test_an_answer_given_before_the_body_is_read_reaches_urllib(server, mark, path, headers, status):
    """urllib got BrokenPipeError or ConnectionResetError instead of these: the server closed the connection
    with the body unread, and the kernel's reset destroyed the answer in flight."""
    body = b"\x89PNG\r\n\x1a\n" + bytes(OVER)
    got, answer = urllib_post(server, path, body, headers)
    assert got == status and list(answer) == ["error"], answer
    healthy(server, mark)


def test_an_upload_over_the_limit_is_answered_on_a_raw_socket(server, mark):
    body = bytes(OVER)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n")
        sock.sendall(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status, answer, headers = read_to_end(sock)
    assert status == 413 and "limit of 10,000,000 bytes" in answer["error"]
    assert headers["connection"] == "close"
    # Chunked: no length up front, so it is refused once 10 MB have come, and the rest is read and dropped.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n")
        sock.sendall(b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(OVER // 1_000_000):
            sock.sendall(b"%x\r\n" % 1_000_000 + bytes(1_000_000) + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        status, answer, _ = read_to_end(sock)
    assert status == 413 and "limit of 10,000,000 bytes" in answer["error"]
    healthy(server, mark)


def test_a_client_that_waits_for_100_continue_is_answered_without_sending(server, mark):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n")
        sock.sendall(f"Expect: 100-continue\r\nContent-Length: {OVER}\r\n\r\n".encode())
        status, answer, headers = read_to_end(sock)  # no "100 Continue": the server wants none of it
    assert status == 413 and headers["connection"] == "close"
    if curl := shutil.which("curl"):  # curl sends Expect: 100-continue for a body this big
        out = subprocess.run(
            [curl, "-s", "-H", "Content-Type: image/png", "--data-binary", "@-", f"{server.url}predict"],
            input=bytes(OVER),
            capture_output=True,
            timeout=60,
        )
        assert "limit of 10,000,000 bytes" in json.loads(out.stdout)["error"]
    healthy(server, mark)


def test_a_body_too_big_to_read_is_cut_off_and_the_server_serves_on(server, mark):
    """Past LINGER_BYTES the rest of a refused body is not read: the connection is closed on the sender."""
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n")
        sock.sendall(b"Content-Length: 10000000000\r\n\r\n")
        with pytest.raises(OSError):  # a reset or a broken pipe, once the 100 MB the server reads have gone
            while sent < 1_000_000_000:
                sock.sendall(bytes(1_000_000))
                sent += 1_000_000
    assert 90_000_000 <= sent < 1_000_000_000
    healthy(server, mark)


def linger(headers: dict, body, **bounds) -> tuple[list, int]:
    """An app that answers 413 without reading, behind LingeringClose: what it sends, and the body bytes read.

    ``body`` yields the chunks the client sends, or None to send nothing more and keep the connection open.
    """
    sent, read = [], 0

    async def app(scope, receive, send) -> None:
        await JSONResponse({"error": "too big"}, status_code=413)(scope, receive, send)

    async def receive() -> dict:
        nonlocal read
        chunk = next(body)
        if chunk is None:
            await asyncio.sleep(3600)
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}

    async def send(message) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(LingeringClose(app, **bounds)(scope, receive, send))
    return sent, read


def test_the_rest_of_a_refused_body_is_read_within_bounds_of_bytes_and_time():
    endless = itertools.repeat(bytes(1000))
    sent, read = linger({"content-length": "10000000000"}, endless, max_bytes=50_000)
    assert 50_000 <= read <= 51_000
    start, answer, end = sent
    assert (b"connection", b"close") in start["headers"]
    assert answer["more_body"] and json.loads(answer["body"]) == {"error": "too big"}  # sent before the reading
    assert end == {"type": "http.response.body", "body": b"", "more_body": False}
    started = time.monotonic()
    sent, read = linger({"content-length": "5000"}, iter([b"x" * 100, None]), idle=0.2)  # then silence
    assert read == 100 and time.monotonic() - started < 2 and len(sent) == 3
    started = time.monotonic()
    sent, read = linger({"transfer-encoding": "chunked"}, itertools.repeat(b"x"), seconds=0.3, idle=10)
    assert time.monotonic() - started < 2 and read > 0 and len(sent) == 3  # trickled in: cut at the deadline


def test_a_request_without_a_body_or_waiting_for_100_continue_is_not_read():
    for headers in ({}, {"content-length": "0"}, {"content-length": "99", "expect": "100-continue"}):
        sent, read = linger(headers, iter([]))
        assert read == 0, headers
    sent, _ = linger({}, iter([]))
    assert (b"connection", b"close") not in sent[0]["headers"]  # kept alive: nothing is left unread
