"""GET /metrics, scraped as Prometheus scrapes it, after requests whose counts are known."""

import json
import os
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving import Server
from test_serve import bar, encoded
from test_serve_lifecycle import worker_pids


def scrape(server: Server) -> dict[tuple, float]:
    """Every sample of one scrape, by (name, sorted labels)."""
    connection = server.connect()
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain; version=")
    text = response.read().decode()
    connection.close()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def requests(samples: dict, route: str, method: str, status: int) -> float:
    key = ("mnist_http_requests_total", (("method", method), ("route", route), ("status", str(status))))
    return samples.get(key, 0)


def send_known_requests(server: Server) -> None:
    for digit in range(7):
        assert server.post(encoded(bar(digit)))[0] == 200
    for _ in range(3):
        assert server.post(b"")[0] == 400
    for i in range(5):  # five paths that do not exist: one label between them
        assert server.request("GET", f"/no/such/path/{i}")[0] == 404
    assert server.request("GET", "/predict")[0] == 405
    assert server.request("GET", "/health", headers={"Host": "evil.example"})[0] == 400  # refused by the guard
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [5, 784], "data": [0] * 5 * 784}
    infer = json.dumps({"inputs": [pixels]}).encode()
    assert server.request("POST", "/v2/models/mnist/infer", infer, {"Content-Type": "application/json"})[0] == 200


def check_counts(samples: dict) -> None:
    assert requests(samples, "/predict", "POST", 200) == 7
    assert requests(samples, "/predict", "POST", 400) == 3
    assert requests(samples, "other", "GET", 404) == 5
    assert requests(samples, "/predict", "GET", 405) == 1
    assert requests(samples, "/health", "GET", 400) == 1
    assert samples[("mnist_images_predicted_total", (("route", "/predict"),))] == 7
    assert samples[("mnist_images_predicted_total", (("route", "/v2/models/{name}/infer"),))] == 5
    latency = ("mnist_http_request_duration_seconds_count", (("method", "POST"), ("route", "/predict")))
    assert samples[latency] == 10
    routes = {dict(labels).get("route") for name, labels in samples if name.startswith("mnist_http")}
    assert not any(route.startswith("/no/") for route in routes), routes


def test_metrics_count_requests_by_route_template_and_status(trained_ckpt, tmp_path):
    server = Server("--ckpt_path", str(trained_ckpt), cwd=tmp_path, log=tmp_path / "log")
    try:
        send_known_requests(server)
        check_counts(scrape(server))
    finally:
        server.stop()


@pytest.mark.slow
def test_every_scrape_sees_every_workers_counts(trained_ckpt, tmp_path):
    server = Server("--ckpt_path", str(trained_ckpt), "--workers", "2", cwd=tmp_path, log=tmp_path / "log",
                    env={"TMPDIR": str(tmp_path)})  # fmt: skip
    try:
        send_known_requests(server)
        check_counts(scrape(server))
        # The workers that counted them (each writes files named for its pid) are killed: the scrapes
        # are answered by workers that served none of those requests, and still see them all.
        (private,) = tmp_path.glob("mnist-serve-*")
        counted = {int(path.stem.split("_")[-1]) for path in (private / "metrics").glob("counter_*.db")}
        assert counted and counted <= worker_pids(server)
        for pid in counted:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while len(worker_pids(server) - counted) < 2 or server.request("GET", "/ready")[0] != 200:
            assert time.monotonic() < deadline and server.alive(), server.log.read_text()
            time.sleep(0.2)
        for _ in range(6):
            check_counts(scrape(server))
    finally:
        server.stop()
    assert not list(tmp_path.glob("mnist-serve-*"))  # the command removes its folder when it stops
