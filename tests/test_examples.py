"""The lesson's pair (examples/): the tutorial in plain PyTorch and in Lightning run, agree, and stay a lesson."""

import ast
import difflib
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAIR = ("tutorial_pytorch.py", "tutorial_lightning.py")
STEPS = ["# 1. Prepare the data", "# 2. Define the network", "# 3. The loss", "# 4. The optimiser", "# 5. Train"]
STEPS.append("# 6. Evaluate")


def run_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python examples/NAME args``, as a learner runs it, from ``cwd``."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def printed_accuracy(stdout: str) -> float:
    """The accuracy on the last line, which must read ``test accuracy: 0.1234``."""
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"test accuracy: [01]\.\d{4}", last), last
    return float(last.split()[-1])


@pytest.fixture(scope="module")
def one_epoch(data_dir, tmp_path_factory) -> dict[str, tuple[float, Path]]:
    """Each script, one epoch on the synthetic data, from a folder of its own: its accuracy and that folder."""
    results = {}
    for name in PAIR:
        cwd = tmp_path_factory.mktemp(name.removesuffix(".py"))
        proc = run_example(name, "--data_dir", str(data_dir), "--epochs", "1", cwd=cwd)
        results[name] = printed_accuracy(proc.stdout), cwd
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", PAIR)
def test_the_script_learns_and_writes_nothing(one_epoch, name):
    accuracy, cwd = one_epoch[name]
    # One epoch on the synthetic bars reaches 0.877 with either script (two reach 1.0); chance is 0.1.
    assert accuracy >= 0.7
    assert not list(cwd.iterdir())  # no lightning_logs, no checkpoints, no downloaded data


@pytest.mark.slow
def test_both_scripts_print_the_same_accuracy(one_epoch):
    # The same seed, the same draws in the same order, the same arithmetic: Lightning runs the plain
    # script's loop, so the weights and the test accuracy come out the same (docs/lesson.md says so).
    assert one_epoch[PAIR[0]][0] == one_epoch[PAIR[1]][0]


@pytest.mark.parametrize("name", PAIR)
def test_the_script_takes_the_six_steps_in_order(name):
    text = (EXAMPLES / name).read_text()
    places = [text.find(step) for step in STEPS]
    assert -1 not in places, [step for step in STEPS if step not in text]
    assert places == sorted(places)
    assert len(text.splitlines()) <= 100  # short enough to read in one sitting


@pytest.mark.parametrize("name", PAIR)
def test_the_script_needs_nothing_from_the_package(name):
    tree = ast.parse((EXAMPLES / name).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {module for module in modules if module.split(".")[0] == "mnist_lightning"}
    assert ("lightning" in modules) == (name == "tutorial_lightning.py")


def test_the_diff_keeps_what_lightning_does_not_change():
    # What Lightning leaves alone must stay the same line for line (indentation aside), so that
    # `diff -u -w` shows only what it changes. Left alone: the imports of torch and torchvision, the
    # options, the seed, the transform, the network's layers.
    plain, lightning = ([line.strip() for line in (EXAMPLES / name).read_text().splitlines()] for name in PAIR)
    matcher = difflib.SequenceMatcher(None, plain, lightning, autojunk=False)
    kept = {i for block in matcher.get_matching_blocks() for i in range(block.a, block.a + block.size)}
    shared = ("import torch", "from torch", "parser", "args", "torch.manual_seed", "transform", "nn.")
    changed = [line for i, line in enumerate(plain) if line.startswith(shared) and i not in kept]
    assert not changed
