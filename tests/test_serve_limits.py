"""Slow, greedy and broken HTTP clients, spoken to with raw sockets: each is refused with one JSON error
(or, having sent nothing, hung up on) within its bound, and the server answers the next client."""

import http.client
import json
import socket
import time

import pytest

from mnist_lightning.serve.protocol import HEAD_BYTES, HEADERS
from serving import Server
from test_serve import bar, encoded

READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server(trained_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    running = Server("--ckpt_path", str(trained_ckpt), "--read_timeout", str(READ_TIMEOUT), cwd=root,
                     log=root / "stderr.log")  # fmt: skip
    yield running
    running.stop()
    # Requests refused mid-body look to the app like clients that hung up: neither may leave a traceback.
    log = (root / "stderr.log").read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-2000:]


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def answer(sock: socket.socket) -> tuple[int, dict, dict]:
    """The status, the JSON body and the headers of the one answer on ``sock``."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.getheaders()}


def trickle(sock: socket.socket, pieces: list[bytes], pause: float) -> bool:
    """Send ``pieces`` one by one, ``pause`` s apart; False once the server has closed the connection."""
    for piece in pieces:
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return False
        time.sleep(pause)
    return True


def refused(server: Server, sock: socket.socket, status: int, words: str) -> None:
    got, body, headers = answer(sock)
    assert (got, list(body)) == (status, ["error"]) and words in body["error"], (got, body)
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert server.post(encoded(bar(4)))[1]["digit"] == 4  # and the next client is served


def test_too_many_headers_are_refused(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: 1\r\n" * HEADERS + b"\r\n")
        refused(server, sock, 431, f"over {HEADERS} headers")


@pytest.mark.parametrize("piece", [1000, 100_000], ids=["in small pieces", "in one piece"])
def test_headers_over_the_size_limit_are_refused(server, piece):
    """One endless header: llhttp buffers it whole and says nothing until its line ends."""
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: ")
        trickle(sock, [b"a" * piece] * (2 * HEAD_BYTES // piece + 1), 0)
        refused(server, sock, 431, "headers are over")


def test_many_headers_within_the_limits_are_fine(server):
    headers = {f"X-H{i}": "v" * 200 for i in range(HEADERS - 5)}
    assert server.request("GET", "/health", headers=headers)[0] == 200


def test_headers_that_trickle_in_are_cut_off(server):
    with connect(server) as sock:
        start = time.monotonic()
        lines = [b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n"] + [b"X-Slow: 1\r\n"] * 20
        trickle(sock, lines, 0.2)
        refused(server, sock, 408, "did not arrive within 1 s")
        assert time.monotonic() - start < READ_TIMEOUT + 3


def test_a_body_that_trickles_in_is_cut_off(server):
    body = encoded(bar(3))
    with connect(server) as sock:
        start = time.monotonic()
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        trickle(sock, [body[i : i + 1] for i in range(40)], 0.1)
        refused(server, sock, 408, "did not arrive within")
        assert time.monotonic() - start < READ_TIMEOUT + 3


def test_a_slow_upload_at_a_fair_pace_is_not_cut_off(server):
    """200 kB at about 100 kB/s, twice the read timeout: each byte buys time, so it arrives whole."""
    body = encoded(bar(6).resize((256, 256)).convert("RGB"), "BMP")
    assert len(body) > 2 * READ_TIMEOUT * 50_000
    with connect(server) as sock:
        start = time.monotonic()
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        assert trickle(sock, [body[i : i + 10_000] for i in range(0, len(body), 10_000)], 0.1)
        status, answered, _ = answer(sock)
        assert time.monotonic() - start > 2 * READ_TIMEOUT
    assert (status, answered) == server.post(body, "image/bmp")  # as if sent at once


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server):
    with connect(server) as sock:
        start = time.monotonic()
        assert sock.recv(1000) == b""  # closed: no 408 for a request that was never begun
        assert READ_TIMEOUT - 0.1 < time.monotonic() - start < READ_TIMEOUT + 3


@pytest.mark.parametrize(
    "request_",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n",
        b"GET /health HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["not HTTP", "space in a header name", "unknown version", "two lengths", "bad chunk size"],
)
def test_malformed_http_is_answered_as_json(server, request_):
    with connect(server) as sock:
        sock.sendall(request_)
        refused(server, sock, 400, "malformed HTTP request")
