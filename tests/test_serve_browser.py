"""The draw-a-digit page in a real browser: Debian's chromium driven by Playwright, with mouse strokes.

With MNIST_DATA_DIR set, a model trained on the real data must read drawn digits right; without it the
synthetic model only shows that the plumbing works. Screenshots go to $TEST_ARTIFACTS (else tmp_path).
"""

import functools
import http.server
import json
import math
import os
import re
import threading
from pathlib import Path

import pytest

from conftest import run_module
from serving import Server

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (the dev extra)")
expect = sync_api.expect

pytestmark = pytest.mark.slow
REAL_DATA = os.environ.get("MNIST_DATA_DIR")
WAIT_MS = 15_000  # a first canvas.toBlob in headless chromium takes about a second here


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> list[tuple[float, float]]:
    return [(cx + rx * math.sin(2 * math.pi * t / n), cy - ry * math.cos(2 * math.pi * t / n)) for t in range(n + 1)]


# Strokes on the 280x280 canvas, as a person would draw them: (x, y) points, one list per stroke.
DIGITS = {
    "1": [[(140, 45), (140, 235)]],
    "0": [ellipse(140, 140, 60, 90)],
    "7": [[(75, 60), (205, 60), (120, 235)]],
    "4": [[(170, 40), (70, 170), (215, 170)], [(170, 40), (170, 240)]],
}


@pytest.fixture(scope="module")
def ckpt(trained_ckpt, tmp_path_factory) -> Path:
    """With the real data, a default fit (5 epochs, about 6 s here); else the session's synthetic one."""
    if not REAL_DATA:
        return trained_ckpt
    root = tmp_path_factory.mktemp("real_fit")
    run_module("mnist_lightning.fit", "--data.data_dir", REAL_DATA, "--trainer.default_root_dir", str(root), cwd=root)
    return Path(json.loads(next(root.glob("lightning_logs/version_*/metrics.json")).read_text())["best_model_path"])


@pytest.fixture
def start(ckpt, browser, tmp_path):
    """start(*server_args, key=None): a fresh server and a page open on it; both are closed afterwards."""
    opened = []

    def start_(*args: str, env: dict | None = None, fragment: str = ""):
        server = Server("--ckpt_path", str(ckpt), *args, cwd=tmp_path, log=tmp_path / f"log{len(opened)}", env=env)
        page = browser.new_page(viewport={"width": 800, "height": 560})
        opened.append((server, page))
        page.goto(server.url + fragment)
        return server, page

    yield start_
    for server, page in opened:
        page.close()
        server.stop()


def draw(page, strokes: list[list[tuple[float, float]]]) -> None:
    box = page.locator("#canvas").bounding_box()
    scale = box["width"] / 280
    for stroke in strokes:
        page.mouse.move(box["x"] + stroke[0][0] * scale, box["y"] + stroke[0][1] * scale)
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=6)
        page.mouse.up()


def bars(page) -> list[float]:
    return [float(p or 0) for p in page.locator("#bars .track").evaluate_all("els => els.map(e => e.dataset.p)")]


def expect_cleared(page) -> None:
    expect(page.locator("#prediction")).to_have_text("")
    assert bars(page) == [0.0] * 10
    assert page.locator("#seen").get_attribute("src") is None


@pytest.mark.skipif(not REAL_DATA, reason="needs MNIST_DATA_DIR: a model trained on the real digits")
def test_drawn_digits_are_read_right(start, artifacts):
    _, page = start()
    for digit, strokes in DIGITS.items():
        draw(page, strokes)
        expect(page.locator("#prediction")).to_have_text(digit, timeout=WAIT_MS)
        page.wait_for_timeout(200)  # the bar's width eases in for 0.12 s
        page.screenshot(path=artifacts / f"serve-{digit}.png")
        assert max(bars(page)) == bars(page)[int(digit)]
        page.locator("#clear").click()
        expect_cleared(page)


def test_a_drawing_gets_a_digit_and_bars_that_sum_to_one(start, artifacts):
    _, page = start()
    draw(page, DIGITS["7"])
    expect(page.locator("#prediction")).to_have_text(re.compile(r"^[0-9]$"), timeout=WAIT_MS)
    probabilities = bars(page)
    assert sum(probabilities) == pytest.approx(1, abs=1e-5) and all(0 <= p <= 1 for p in probabilities)
    assert probabilities.index(max(probabilities)) == int(page.locator("#prediction").inner_text())
    assert page.locator("#seen").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [28, 28]
    assert page.locator("#error").inner_text() == ""
    page.screenshot(path=artifacts / "serve-plumbing.png")
    page.keyboard.press("Escape")  # the keyboard shortcut for Clear
    expect_cleared(page)
    draw(page, DIGITS["1"])
    expect(page.locator("#prediction")).to_have_text(re.compile(r"^[0-9]$"), timeout=WAIT_MS)
    page.locator("#clear").click()
    expect_cleared(page)


def test_a_refusal_and_a_server_that_is_down_show_on_the_page(start, artifacts):
    server, page = start(env={"MNIST_API_KEY": "k3y"})  # a page without the key gets a real 401
    draw(page, DIGITS["1"])
    expect(page.locator("#error")).to_contain_text("missing or wrong API key", timeout=WAIT_MS)
    expect(page.locator("#prediction")).to_have_text("")
    page.goto(server.url + "#key=k3y")
    draw(page, DIGITS["1"])
    expect(page.locator("#prediction")).to_have_text(re.compile(r"^[0-9]$"), timeout=WAIT_MS)
    server.stop()
    page.locator("#clear").click()
    draw(page, DIGITS["0"])
    expect(page.locator("#error")).to_contain_text("Cannot reach the server", timeout=WAIT_MS)
    expect(page.locator("#prediction")).to_have_text("")
    page.screenshot(path=artifacts / "serve-down.png")


def test_a_page_on_another_origin_cannot_drive_the_server(start, tmp_path):
    """Another site's page makes the browser send a form upload (no preflight for a "simple" request) and a
    fetch; the server refuses both with 403 before decoding anything, and the page cannot read either."""
    server, own_page = start()
    files = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), files)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    (tmp_path / "evil.html").write_text("<html><body>another site</body></html>")
    try:
        page = own_page.context.browser.new_page()
        page.goto(f"http://127.0.0.1:{other.server_address[1]}/evil.html")
        script = """async url => {
            const png = await (await fetch("data:image/png;base64," + %s)).blob();
            const form = new FormData(); form.append("file", png, "digit.png");
            await fetch(url, {method: "POST", mode: "no-cors", body: form});   // a simple request
            try { await fetch(url, {method: "POST", body: png}); return "read"; } catch (e) { return "blocked"; }
        }"""
        png = '"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="'
        with page.expect_response(server.url + "predict") as first:
            outcome = page.evaluate(script % png, server.url + "predict")
        assert first.value.status == 403 and outcome == "blocked"
        page.close()
    finally:
        other.shutdown()
        other.server_close()
