"""The server's life: the line that says it is up, the key it starts with, the model its workers keep, and
how it stops (ready, drain, stop), as a process under load sees it."""

import http.client
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from serving import Server
from test_serve import bar, encoded, refusal

DRAIN, GRACE = 2.0, 3.0


def worker_pids(server: Server) -> set[int]:
    """The --workers N processes: the supervisor's children that multiprocessing spawned."""
    pids = set()
    for task in os.listdir(f"/proc/{server.proc.pid}/task"):
        for child in open(f"/proc/{server.proc.pid}/task/{task}/children").read().split():
            try:
                if "spawn_main" in open(f"/proc/{child}/cmdline").read():
                    pids.add(int(child))
            except FileNotFoundError:
                pass
    return pids


def post(port: int, body: bytes) -> tuple[int, dict]:
    """One request on a new connection, as a client that a balancer just sent here makes it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def stop_under_load(server: Server) -> dict:
    """SIGTERM while three clients send digits; they stop sending halfway through the drain, as clients
    behind a balancer that polls readiness would. Returns what each saw and when things happened."""
    body, results, start = encoded(bar(7)), [], time.monotonic()
    stop_sending = [float("inf")]

    def client() -> None:
        while time.monotonic() < stop_sending[0]:
            sent = time.monotonic()
            try:
                results.append((sent, *post(server.port, body)))
            except OSError as err:
                results.append((sent, repr(err), b""))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    time.sleep(1)
    term = time.monotonic()
    stop_sending[0] = term + DRAIN / 2
    server.proc.send_signal(signal.SIGTERM)
    not_ready = None
    while server.proc.poll() is None and time.monotonic() < term + 30:
        # The Open Inference Protocol's readiness follows the same flag.
        statuses = {server.request("GET", path)[0] for path in ("/ready", "/v2/health/ready")}
        if statuses == {503} and not_ready is None:
            not_ready = time.monotonic()
        time.sleep(0.05)
    exited = time.monotonic()
    for thread in clients:
        thread.join()
    return {"results": results, "start": start, "term": term, "not_ready": not_ready, "exited": exited}


def check_stop(seen: dict) -> None:
    results, term = seen["results"], seen["term"]
    failed = [(round(sent - term, 2), status) for sent, status, _ in results if status != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed (seconds after SIGTERM, status): {failed[:5]}"
    assert sum(sent > term for sent, _, _ in results) >= 3  # new connections were answered while draining
    assert seen["not_ready"] is not None and seen["not_ready"] - term < 1, "readiness did not turn 503 at once"
    assert seen["not_ready"] < seen["exited"] and seen["exited"] - term < DRAIN + GRACE + 5


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_turns_not_ready_drains_and_stops_in_time(trained_ckpt, tmp_path, workers):
    server = Server("--ckpt_path", str(trained_ckpt), "--workers", str(workers), "--drain_seconds", str(DRAIN),
                    "--grace_seconds", str(GRACE), cwd=tmp_path, log=tmp_path / "log")  # fmt: skip
    try:
        check_stop(stop_under_load(server))
        # One process ends as uvicorn ends it, by SIGTERM again; the supervisor of N exits cleanly.
        assert server.proc.wait(5) == (-signal.SIGTERM if workers == 1 else 0), server.log.read_text()
    finally:
        server.stop()


def head(length: int) -> bytes:
    return f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n\r\n".encode()


def answer(sock: socket.socket) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


@pytest.mark.slow
def test_a_request_in_flight_when_the_port_closes_is_answered(trained_ckpt, tmp_path):
    server = Server("--ckpt_path", str(trained_ckpt), "--drain_seconds", "1", "--grace_seconds", "5",
                    cwd=tmp_path, log=tmp_path / "log")  # fmt: skip
    try:
        body = encoded(bar(2))
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head(len(body)) + body[:10])
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(1.5)  # past the drain: the port is closed now
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
            sock.sendall(body[10:])
            status, text = answer(sock)
        assert status == 200 and b'"digit":2' in text
        server.proc.wait(10)
    finally:
        server.stop()


def test_a_half_sent_request_cannot_hold_a_stopping_server(trained_ckpt, tmp_path):
    server = Server("--ckpt_path", str(trained_ckpt), "--grace_seconds", "1", "--read_timeout", "60",
                    cwd=tmp_path, log=tmp_path / "log")  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head(1000) + b"\x89PNG")  # and never the rest
            time.sleep(0.2)
            term = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                pytest.fail("a half-sent request kept the stopping server alive")
            assert time.monotonic() - term < 5
    finally:
        server.stop()


def started(tmp_path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """A server process and the first line it printed (stderr to a file)."""
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mnist_lightning.serve", "--port", "0", "--drain_seconds", "0", *args],
            cwd=tmp_path,
            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    return proc, proc.stdout.readline() if ready else ""


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_the_serving_line_comes_once_the_port_answers(trained_ckpt, tmp_path, workers):
    proc, line = started(tmp_path, "--ckpt_path", str(trained_ckpt), "--workers", str(workers))
    try:
        assert line.startswith("serving "), (line, (tmp_path / "log").read_text())
        port = int(line.rsplit(":", 1)[1].strip(" /\n"))
        status, text = post(port, encoded(bar(3)))  # at once, no retry
        assert status == 200 and b'"digit":3' in text
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()


def test_an_empty_or_unreadable_key_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").write_text("\n")
    monkeypatch.delenv("MNIST_API_KEY", raising=False)
    assert "--api_key is empty, which would leave the API open" in refusal(capsys, "--api_key", "")
    assert "is empty" in refusal(capsys, "--api_key_file", str(tmp_path / "empty"))
    assert "cannot read --api_key_file" in refusal(capsys, "--api_key_file", str(tmp_path / "missing"))
    assert "not both" in refusal(capsys, "--api_key", "a", "--api_key_file", str(tmp_path / "empty"))
    assert "printable ASCII without spaces" in refusal(capsys, "--api_key", "two words")
    monkeypatch.setenv("MNIST_API_KEY", "")
    assert "$MNIST_API_KEY is empty" in refusal(capsys, "--ckpt_path", "missing.ckpt")


def test_argument_errors_are_one_line(capsys):
    for args in (["--bogus"], ["--port", "abc"], ["--workers"], ["--drain_seconds", "-1"], ["extra"]):
        assert "error: " in refusal(capsys, *args), args


def test_a_key_on_the_command_line_is_warned_about(tmp_path):
    proc, _ = started(tmp_path, "--api_key", "s3cret", "--ckpt_path", "missing.ckpt")
    proc.wait(60)
    proc.stdout.close()
    err = (tmp_path / "log").read_text()
    assert err.startswith("warning: an --api_key on the command line shows in ps") and "s3cret" not in err


def test_the_key_can_come_from_a_file(trained_ckpt, tmp_path):
    (tmp_path / "key").write_text("s3cret\n")
    (tmp_path / "key").chmod(0o600)
    keyed = Server("--ckpt_path", str(trained_ckpt), "--api_key_file", str(tmp_path / "key"), cwd=tmp_path,
                   log=tmp_path / "log", env={"MNIST_API_KEY": "other"})  # fmt: skip
    try:
        assert keyed.post(encoded(bar(2)))[0] == 401
        assert keyed.post(encoded(bar(2)), headers={"X-API-Key": "other"})[0] == 401
        assert keyed.post(encoded(bar(2)), headers={"X-API-Key": "s3cret"})[1]["digit"] == 2
        assert "warning" not in keyed.log.read_text()
    finally:
        keyed.stop()


@pytest.mark.slow
def test_a_restarted_worker_serves_the_model_loaded_at_start(trained_ckpt, tmp_path):
    served = tmp_path / "model.ckpt"
    served.write_bytes(trained_ckpt.read_bytes())
    server = Server("--ckpt_path", str(served), "--workers", "2", cwd=tmp_path, log=tmp_path / "log",
                    env={"TMPDIR": str(tmp_path)})  # fmt: skip
    try:
        before = [server.post(encoded(bar(d)))[1]["probabilities"] for d in range(10)]
        # A resumed run replaces its checkpoint: another model now sits under the name.
        other = torch.load(trained_ckpt, weights_only=True)
        other["state_dict"] = {k: v.flip(0) for k, v in other["state_dict"].items()}
        torch.save(other, served)
        first = worker_pids(server)
        assert len(first) == 2
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not (len(worker_pids(server)) == 2 and not worker_pids(server) & first):
            assert time.monotonic() < deadline and server.alive(), server.log.read_text()
            time.sleep(0.2)
        while server.request("GET", "/ready")[0] != 200:
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.2)
        after = [server.post(encoded(bar(d)))[1]["probabilities"] for d in range(10)]
        assert after == before
        restarted = worker_pids(server)
        assert len(restarted) == 2 and not restarted & first  # no crash loop: the same two serve on
    finally:
        server.stop()
    assert not list(tmp_path.glob("mnist-serve-*"))
