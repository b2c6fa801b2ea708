import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(data_dir, tmp_path, **env) -> subprocess.CompletedProcess:
    """Run benchmarks/gpu_check.sh on the CPU, one epoch, with extra environment settings."""
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(data_dir)],
        cwd=tmp_path,
        env={**os.environ, "DEVICE": "cpu", "EPOCHS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_path(data_dir, tmp_path):
    """The GPU script must be ready before a GPU is: run every step of it on the CPU, one epoch."""
    proc = gpu_check(data_dir, tmp_path, FIT_ARGS="--data.val_size 100")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = dict(part.split("\n", 1) for part in proc.stdout.split("## ")[1:])
    name = {title: title.split(",")[0].split(" (")[0] for title in stages}  # "eager", "bf16-mixed", ...
    rows = {name[title]: text.count("| (c) fit default, batch") for title, text in stages.items()}
    assert rows == {"eager": 3, "bf16-mixed": 1, "torch.compile": 2, "torch.compile reduce-overhead": 1}
    for title, text in stages.items():  # the bf16-mixed fit goes against the eager stage's (b)
        plain = text.count("| (b) in-memory loop, batch")
        assert plain == text.count("| (c) fit") * (name[title] != "bf16-mixed"), title
        # Under the table, every run's seconds per epoch: one figure each, at EPOCHS=1.
        epochs = re.findall(r"^  \([bc]\) [^:|]+: (\d+\.\d+)$", text, re.M)
        assert len(epochs) == text.count("| (") and all(float(s) > 0 for s in epochs), title
    # Each stage says how long it took and how much of the budget is left, for sizing the next run.
    left = [int(n) for n in re.findall(r"^stage took \d+ s; (\d+) s of the budget left$", proc.stdout, re.M)]
    assert len(left) == 4 and left == sorted(left, reverse=True) and left[0] < 290


@pytest.mark.slow
def test_accuracy_prints_a_row_per_recipe(data_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), str(data_dir), "--seeds", "0"]
        + ["--fit-args", "--data.val_size 100 --trainer.max_epochs 1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^\| fit, (.+?) \| (\d+\.\d\d) \|", proc.stdout, re.M)
    assert [name for name, _ in rows] == ["the defaults", "configs/tutorial.yaml"]
    assert all(10 < float(acc) <= 100 for _, acc in rows)


@pytest.mark.slow
def test_inference_prints_predict_and_the_runtimes(data_dir, trained_ckpt, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "inference.py"), str(trained_ckpt), str(data_dir)]
        + ["--images", "50", "--runs", "1", "--calls", "20"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^predict, 50 PNGs: [\d,]+ images/s in-process", proc.stdout, re.M)
    assert re.search(r"^\| predict, one image \| \d+\.\d\d \|", proc.stdout, re.M)
    runtimes = re.findall(r"^\| (PyTorch \(eager\)|ONNX Runtime|TorchScript) \| (1|301) \|", proc.stdout, re.M)
    assert len(runtimes) == 6


@pytest.mark.slow
def test_serve_prints_a_table_per_image_kind(data_dir, trained_ckpt, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), str(trained_ckpt), str(data_dir)]
        + ["--seconds", "1", "--max_seconds", "2", "--connections", "2", "--workers", "1", "--pngs", "4"]
        + ["--jpegs", "1", "--client", "asyncio", "--v2_batches", "1", "3", "--v2_connections", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("| workers | connections | requests/s |") == 2
    rows = re.findall(r"^\| 1 \| 2 \| ([\d,.]+) \|.*\| (\d+) \| [\d,]+ \| \d+ \|$", proc.stdout, re.M)
    assert len(rows) == 2 and all(float(rate.replace(",", "")) > 0 and errors == "0" for rate, errors in rows)
    # The infer rows: binary and JSON tensors at each batch, all answered; images/s is requests/s x batch.
    row = r"^\| 1 \| 2 \| (binary|JSON) \| (\d) \| ([\d,.]+) \| ([\d,]+) \| \d+% \|.*\| (\d+) \| [\d,]+ \| \d+ \|$"
    infers = [
        (tensors, int(batch), float(rate.replace(",", "")), int(images.replace(",", "")), errors)
        for tensors, batch, rate, images, errors in re.findall(row, proc.stdout, re.M)
    ]
    assert [row[:2] for row in infers] == [("binary", 1), ("binary", 3), ("JSON", 1), ("JSON", 3)]
    assert all(errors == "0" and abs(images - rate * batch) <= batch for _, batch, rate, images, errors in infers)


@pytest.mark.slow  # it asks a fresh process, which imports Lightning (5 s of CPU)
def test_speed_turns_off_each_speedup_alone(monkeypatch):
    """speed.py's "without X" rows must follow the package's speedups: one row per name, each with X alone off.
    Its own copy of the names once lost one, so every row also ran without that speedup and none showed it."""
    from mnist_lightning.training import speedups

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    speed = importlib.import_module("speed")
    names = speed.speedup_names()
    assert names == list(speedups.NAMES)
    monkeypatch.setattr(speedups, "_active", speedups._active)  # configure() sets it; put it back after
    for name, setting in speed.without_each(names).items():
        assert speedups.configure(setting) == set(speedups.NAMES) - {name}, name
