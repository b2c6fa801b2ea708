"""The lesson (docs/lesson.md and docs/lesson.pt-BR.md) holds as written: its commands run, its diff is the
scripts' diff, its Python runs, and the options and files it names exist."""

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ["lesson.md", "lesson.pt-BR.md"]
PAIR = ["examples/tutorial_pytorch.py", "examples/tutorial_lightning.py"]
DIFF = ["diff", "-u", "-w", *PAIR]


def blocks(doc: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", (ROOT / "docs" / doc).read_text(), re.S | re.M)


def commands(doc: str) -> list[list[str]]:
    """Each line of the doc's bash blocks, split as the shell splits it, comments dropped."""
    return [shlex.split(line, comments=True) for block in blocks(doc, "bash") for line in block.splitlines()]


def run(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)


@cache
def run_example(argv: tuple[str, ...], data_dir: Path, cwd: Path) -> str:
    """A documented `python examples/...` line, on the synthetic data for one epoch; once per distinct line."""
    args = [str(data_dir) if arg == "DATA_DIR" else arg for arg in argv[1:]]
    if "--data_dir" not in args:
        args += ["--data_dir", str(data_dir)]  # the default, data/, would download
    proc = run([sys.executable, *args, "--epochs", "1"], cwd=cwd)  # the last --epochs wins
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip().splitlines()[-1]


@cache
def help_text(module: str) -> str:
    proc = run([sys.executable, "-m", module, "--help"])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("doc", LESSONS)
def test_the_two_lessons_link_to_each_other(doc):
    other = next(name for name in LESSONS if name != doc)
    assert f"]({other})" in "\n".join((ROOT / "docs" / doc).read_text().splitlines()[:5])


@pytest.mark.parametrize("doc", LESSONS)
def test_the_diff_shown_is_the_scripts_diff(doc):
    # The doc cuts the diff into pieces to explain each; put together, they are the whole of it.
    proc = run(DIFF)
    assert proc.returncode == 1, proc.stderr  # 1: the files differ; 2: trouble
    actual = [line.rstrip() for line in proc.stdout.splitlines()[2:]]  # without the ---/+++ lines and their dates
    shown = [line.rstrip() for block in blocks(doc, "diff") for line in block.splitlines()]
    assert shown == actual


@pytest.mark.parametrize("doc", LESSONS)
def test_the_python_runs(doc, tmp_path):
    code = blocks(doc, "python")
    assert code
    for block in code:
        proc = run([sys.executable, "-c", block], cwd=tmp_path)
        assert proc.returncode == 0, f"{block}\n{proc.stderr}"


@pytest.mark.parametrize("doc", LESSONS)
def test_the_files_named_exist(doc):
    text = (ROOT / "docs" / doc).read_text()
    named = set(re.findall(r"`((?:src|examples|configs)/[\w/.-]+)`", text))
    named |= {arg for argv in commands(doc) for arg in argv if arg.startswith(("examples/", "configs/"))}
    assert named
    assert not sorted(path for path in named if not (ROOT / path).exists())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Where the documented commands run: the examples linked in, so that nothing lands in the repository."""
    cwd = tmp_path_factory.mktemp("lesson")
    (cwd / "examples").symlink_to(ROOT / "examples")
    return cwd


@pytest.mark.slow
@pytest.mark.parametrize("doc", LESSONS)
def test_the_commands_run(doc, data_dir, workdir):
    """Every command line of the lesson is run or checked; a line of a new kind fails until it has a check."""
    for argv in filter(None, commands(doc)):
        if argv[0] == "python" and argv[1] in PAIR:
            assert re.fullmatch(r"test accuracy: [01]\.\d{4}", run_example(tuple(argv), data_dir, workdir))
        elif argv == DIFF:
            assert run(argv).returncode == 1  # what it prints, test_the_diff_shown_is_the_scripts_diff checks
        elif argv[:2] == ["python", "-m"] and argv[2].startswith("mnist_lightning."):
            # Training is test_fit.py's business; here, that the options exist.
            listed = set(re.findall(r"--[\w.]+", help_text(argv[2])))
            options = [arg.split("=")[0] for arg in argv[3:] if arg.startswith("--")]
            assert set(options) <= listed, shlex.join(argv)
        else:
            raise AssertionError(f"no check for this documented command: {shlex.join(argv)}")
