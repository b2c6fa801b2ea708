"""What a user sees in TensorBoard, in a real browser: TensorBoard on loopback over a short fit's run,
driven by Playwright in Debian's Chromium. Screenshots go to $TEST_ARTIFACTS (else a temporary folder)."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard(fit_result, tmp_path_factory):
    """TensorBoard over the session's fit (a one-cycle run, so there is a learning-rate curve)."""
    run = Path(fit_result["best_model_path"]).parents[1]
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(run), "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/data/runs", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise AssertionError(f"tensorboard did not start: {server.stderr.read()}") from None
            time.sleep(0.3)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def page(browser, artifacts, request):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    yield page
    page.screenshot(path=str(artifacts / f"tensorboard-{request.node.name}.png"))
    page.close()


def cards(page) -> list[str]:
    """The tags of the cards on the page (a card's title shows a tag as its group, then the rest)."""
    return ["".join(text.split("\n")[:2]) for text in page.locator("card-view").all_inner_texts()]


def test_scalars_are_filed_under_the_metric_keys(tensorboard, page):
    """The tags are the keys the console and metrics.json print (train/acc, val/loss, ...), one spelling each;
    Custom Scalars (below) puts train and val on the same axes."""
    page.goto(f"{tensorboard}/#timeseries")
    page.locator("card-view").first.wait_for(timeout=30_000)
    groups = page.locator("metrics-card-group-toolbar .group-title").all_inner_texts()
    assert groups == ["lr", "test", "train", "val"], groups  # no "epoch" staircase, no acc/ or loss/ aliases
    page.get_by_role("combobox", name="Filter tags (regex)").fill("^(train|val)/")
    page.wait_for_timeout(2000)
    shown = cards(page)
    for tag in ("train/acc", "val/acc", "val/acc_best", "train/loss", "train/loss_step", "val/loss"):
        assert tag in shown, (tag, shown)


def test_custom_scalars_put_train_and_val_on_the_same_axes(tensorboard, page):
    page.goto(f"{tensorboard}/#custom_scalars")
    page.get_by_text("learning curves").first.wait_for(timeout=30_000)
    for title in ("loss, train and val", "accuracy, train and val", "learning rate"):
        assert page.get_by_text(title).first.is_visible(), title


def test_images_hold_the_confusion_matrix_and_the_mistakes(tensorboard, page):
    page.goto(f"{tensorboard}/#images")
    page.get_by_text("test/confusion_matrix").first.wait_for(timeout=30_000)
    assert page.get_by_text("test/mistakes").first.is_visible()
    images = page.locator("img")
    images.first.wait_for(timeout=30_000)
    sizes = [image.evaluate("i => [i.naturalWidth, i.naturalHeight]") for image in images.all()]
    assert any(w >= 600 and h >= 600 for w, h in sizes), sizes  # the confusion matrix, at a legible size


def test_hparams_list_the_run_with_its_metrics(tensorboard, page):
    page.goto(f"{tensorboard}/#hparams")
    page.get_by_text("val/acc_best").first.wait_for(timeout=30_000)
    for column in ("test/acc", "test/loss", "model/lr", "trainer/max_epochs", "trainer/seed"):
        assert page.get_by_text(column).first.is_visible(), column
