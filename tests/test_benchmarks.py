import os
import subprocess
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
    for batch in (64, 1024):
        assert proc.stdout.count(f"| (b) in-memory loop, batch {batch} |") == 2  # eager and compiled
        assert proc.stdout.count(f"| (c) fit default.yaml, batch {batch} |") == 2
    assert "## bf16-mixed" in proc.stdout and "test/acc" in proc.stdout.split("## bf16-mixed")[1]


@pytest.mark.slow
def test_gpu_check_reports_a_stage_past_its_limit_and_goes_on(data_dir, tmp_path):
    """A stage that runs too long costs only itself: each says so, the next one runs, the exit is non-zero."""
    proc = gpu_check(data_dir, tmp_path, STAGE_TIMEOUT="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("## ") == 3
    assert proc.stdout.count("stage failed or ran past 1s (exit 124)") == 3
