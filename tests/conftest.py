"""Tiny synthetic MNIST-format files, written once per session; nothing is downloaded."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# An odd test size, so that splitting it over two DDP ranks would need padding.
TRAIN_SIZE, TEST_SIZE = 1000, 301


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file: magic 0x0000_08_<ndim>, big-endian dims, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c is a bright bar at rows 2c+4..2c+7 over faint noise: easy to learn, impossible to guess."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for c in range(10):
        images[labels == c, 2 * c + 4 : 2 * c + 8, 6:22] += 180
    return images.clip(0, 255).astype(np.uint8), labels


def write_dataset(raw_dir: Path) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", TRAIN_SIZE, 1), ("t10k", TEST_SIZE, 2)):
        images, labels = synthetic_digits(n, seed)
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder holding synthetic MNIST and Fashion-MNIST in torchvision's layout."""
    root = tmp_path_factory.mktemp("data")
    for name in ("MNIST", "FashionMNIST"):
        write_dataset(root / name / "raw")
    return root


# Options that make a fit on the synthetic data take seconds.
FAST = [
    "--data.val_size",
    "100",
    "--trainer.max_epochs",
    "2",
    "--trainer.log_every_n_steps",
    "2",
    "--trainer.enable_model_summary",
    "false",
]


@pytest.fixture(scope="session")
def fit_result(data_dir, tmp_path_factory) -> dict:
    """A tiny fit, once per session; a low peak lr, so that some test digits are misread; no shift, as the
    synthetic classes differ only in the row of their bar."""
    from mnist_lightning.fit import cli_main

    root = tmp_path_factory.mktemp("fit")
    recipe = ["--data.batch_size", "256", "--model.scheduler", "onecycle", "--model.lr", "0.001", "--data.shift", "0"]
    return cli_main(["--data.data_dir", str(data_dir), *FAST, *recipe, "--trainer.default_root_dir", str(root)])


@pytest.fixture(scope="session")
def trained_ckpt(fit_result) -> Path:
    """The best checkpoint of that fit, the one it tested."""
    return Path(fit_result["best_model_path"])


def run_module(
    module: str, *args: str, cwd: Path, check: bool = True, warnings: str = "ignore"
) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` the way a user would, with output captured (and warnings ignored,
    unless ``warnings`` is "default", as in a user's shell)."""
    env = {**os.environ, "PYTHONWARNINGS": warnings}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


CHROMIUM = "/usr/bin/chromium"  # Debian's; `playwright install` cannot download browsers here


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Playwright; the test is skipped, saying why, without either."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (dev extra)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install -y chromium")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Where screenshots go: $TEST_ARTIFACTS, else a temporary folder."""
    folder = Path(os.environ.get("TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def spy_program(folder: Path, name: str) -> tuple[Path, Path]:
    """A stand-in for the external program ``name`` that records each run of it in a file instead of working.

    Returns the folder to put first on PATH and the record, which exists only once the program ran.
    """
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{name}.ran"
    program = folder / name
    program.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\nexit 1\n')
    program.chmod(0o755)
    return folder, record


def foreign_images(folder: Path) -> dict[str, Path]:
    """A small image in each format Pillow can write that a user's image is never read as, by format name.

    EPS is PostScript, which Pillow's EPS plugin hands to Ghostscript; XBM and XPM are C source.
    """
    from PIL import Image

    from mnist_lightning.files.images import FORMATS

    Image.init()
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    # MPO is a JPEG (and read as one); PDF, PALM and the stubs are written but never read by Pillow at all.
    for kind in sorted(set(Image.SAVE) - set(FORMATS) - {"MPO"}):
        path = folder / f"seven.{kind.lower()}"
        image = Image.new("L", (32, 32), 255)
        image.paste(0, (10, 4, 22, 28))
        for mode in ("L", "RGB", "1"):  # each writer takes some modes only
            try:
                image.convert(mode).save(path, kind)
                written[kind] = path
                break
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
    return written
