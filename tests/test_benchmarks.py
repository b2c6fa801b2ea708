import os
import re
import signal
import subprocess
import time
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
def test_gpu_check_reports_a_stage_past_its_limit_and_goes_on(data_dir, tmp_path):
    """A stage that runs too long costs only itself: each says so, the next one runs, the exit is non-zero."""
    proc = gpu_check(data_dir, tmp_path, STAGE_TIMEOUT="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("## ") == 4
    assert proc.stdout.count("stage failed or ran past its 1s limit (exit 124)") == 4


@pytest.mark.slow
def test_gpu_check_ends_within_its_budget(data_dir, tmp_path):
    """Once the budget is spent the stages left are skipped, each saying so, not run past it."""
    # Importing torch takes 1-2 s here, and the first stage alone about 20 s.
    proc = gpu_check(data_dir, tmp_path, BUDGET="10", FIT_ARGS="--data.val_size 100")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    outcomes = [
        [line for line in part.splitlines() if line.startswith("stage ")] for part in proc.stdout.split("## ")[1:]
    ]
    cut, skipped = "stage failed or was cut at the 10s budget (exit 124)", "stage skipped: the 10s budget is spent"
    assert outcomes[1:] == [[skipped]] * 3 and outcomes[0][0] == cut
    assert re.fullmatch(r"stage took \d+ s; 0 s of the budget left", outcomes[0][1])


def test_gpu_check_stops_when_importing_torch_outlasts_the_budget(data_dir, tmp_path):
    stub = tmp_path / "bin" / "python"  # a python that hangs
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nsleep 30\n")
    stub.chmod(0o755)
    proc = gpu_check(data_dir, tmp_path, BUDGET="1", PATH=f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "the 1s budget ran out importing torch\n")


def processes_in(folder: Path) -> list[str]:
    """The processes whose working directory is folder (Linux /proc)."""
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if cwd.resolve() == folder.resolve():
                found.append(cwd.parent.name)
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


@pytest.mark.slow
def test_ctrl_c_stops_the_gpu_check_and_its_stage(data_dir, tmp_path):
    """timeout puts a stage in a process group of its own, away from a terminal's Ctrl-C, which reaches
    only bash: the script must stop the stage itself and exit, not wait out the limit and go on."""
    proc = subprocess.Popen(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(data_dir)],
        cwd=tmp_path,
        env={**os.environ, "DEVICE": "cpu", "EPOCHS": "1", "FIT_ARGS": "--data.val_size 100"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a shell, whatever the test runner was started with: SIGINT not ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout.readline().startswith("torch ") and proc.stdout.readline() == "## eager\n"
    time.sleep(2)  # the stage is under way: speed.py and its first variant
    assert len(processes_in(tmp_path)) >= 3  # bash, timeout, speed.py, ...
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends to bash, outside the stage's group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, out + err
    assert time.monotonic() - start < 10 and "## torch.compile" not in out
    deadline = time.monotonic() + 10
    while processes_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in(tmp_path) == []


@pytest.mark.parametrize("setting", [{"BUDGET": "5m"}, {"STAGE_TIMEOUT": "1.5"}, {"STAGE_TIMEOUT": "0"}])
def test_gpu_check_refuses_a_limit_that_is_not_whole_seconds(data_dir, tmp_path, setting):
    proc = gpu_check(data_dir, tmp_path, **setting)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"BUDGET and STAGE_TIMEOUT must be whole seconds, got '{next(iter(setting.values()))}'\n"
