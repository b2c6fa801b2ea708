import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_path(data_dir, tmp_path):
    """The GPU script must be ready before a GPU is: run every step of it on the CPU, one epoch."""
    env = {**os.environ, "DEVICE": "cpu", "EPOCHS": "1", "FIT_ARGS": "--data.val_size 100"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(data_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for batch in (64, 1024):
        assert proc.stdout.count(f"| (b) in-memory loop, batch {batch} |") == 2  # eager and compiled
        assert proc.stdout.count(f"| (c) fit default.yaml, batch {batch} |") == 2
    assert "## bf16-mixed" in proc.stdout and "test/acc" in proc.stdout.split("## bf16-mixed")[1]
