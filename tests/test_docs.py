"""The documentation's code runs as pasted, against the files the README's commands produce."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import run_module
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.idx import load_split
from mnist_lightning.net import normalise

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_block_after(doc: Path, marker: str) -> str:
    """The first ```python block after the line that holds ``marker``."""
    text = doc.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(marker) :], re.S).group(1)


def test_the_onnx_runtime_example_runs_as_pasted(data_dir, trained_ckpt, tmp_path):
    # What fit's default --data.data_dir and the documented export command leave in a folder.
    shutil.copytree(data_dir / "MNIST", tmp_path / "data" / "MNIST")
    export = ["--ckpt_path", str(trained_ckpt), "--format", "onnx", "--output", "model.onnx"]
    run_module("mnist_lightning.export", *export, cwd=tmp_path)
    code = python_block_after(DOCS / "using-the-model.md", "Running the ONNX file needs only")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = [int(d) for d in re.search(r"^\[([\d ]+)\]", proc.stdout).group(1).split()]
    net, (mean, std), _ = load_checkpoint(trained_ckpt)
    images, _ = load_split(data_dir / "MNIST" / "raw", "test")
    with torch.inference_mode():
        expected = net(normalise(images[:8], mean, std)).argmax(1).tolist()
    assert printed == expected
