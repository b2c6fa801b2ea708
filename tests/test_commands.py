"""What evaluate, predict, export and serve share: one command line, parsed from each one's signature, and
one meaning of ``--ckpt_path`` (best, last or a path)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_module
from mnist_lightning import evaluate, export, predict
from mnist_lightning.errors import run_main
from mnist_lightning.files.idx import load_split
from mnist_lightning.serve import app, lifecycle, server

COMMANDS = {"evaluate": evaluate, "predict": predict, "export": export, "serve": server}
# An option of each command, explained in --help in its docstring's words.
HELP = {
    "evaluate": "--data.eval_batch_size EVAL_BATCH_SIZE images per model call",
    "predict": "--save_preprocessed SAVE_PREPROCESSED folder to write the 28x28 images the model saw to",
    "export": "--normalised_input [{true,false}] leave out the normalisation",
    "serve": "--cors_origins CORS_ORIGINS, --cors_origins+ CORS_ORIGINS other web pages",
}


@pytest.fixture
def mnist_pngs(data_dir, tmp_path) -> Path:
    """Twenty synthetic test digits as PNG files, in a folder of their own."""
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(load_split(data_dir / "MNIST" / "raw", "test")[0][:20, 0].numpy()):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture
def runs(trained_ckpt, tmp_path, monkeypatch) -> dict[str, Path]:
    """A run folder in the working directory: the trained checkpoint as its best, and as its last a network
    that reads every image as a 0, so that which of the two a command used shows in what it says."""
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    best = Path(shutil.copy(trained_ckpt, folder / "best-epoch2-val_acc0.9000.ckpt"))
    zeros = torch.load(trained_ckpt, weights_only=True)
    zeros["state_dict"]["net.5.bias"][0] += 1000
    torch.save(zeros, folder / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    return {"best": best.relative_to(tmp_path), "last": (folder / "last.ckpt").relative_to(tmp_path)}


@pytest.fixture
def served(monkeypatch) -> list[dict]:
    """serve, in-process, up to the point where uvicorn would start: the options each app was made with."""
    made = []
    create_app = app.create_app
    monkeypatch.setattr(
        app, "create_app", lambda *args, **options: made.append(options) or create_app(*args, **options)
    )
    # Started: it says so (serve.lifecycle.Server, once uvicorn accepts), and stops at once.
    monkeypatch.setattr(lifecycle.Server, "run", lambda self, sockets: self.announce() or sockets[0].close())
    return made


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_the_usage_and_each_options_meaning(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        COMMANDS[name].cli_main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: python -m mnist_lightning.{name} [--config CONFIG]")
    words = " ".join(out.split())  # as wide as the terminal
    assert "--print_config" in words and HELP[name] in words
    assert "--ckpt_path CKPT_PATH best or last (the newest run's under ./lightning_logs)" in words
    assert "or a checkpoint written by fit (type: str, default: best)" in words


@pytest.mark.parametrize(
    "name, args, message",
    [
        (
            "predict",
            ["x.png", "--save-preprocessed", "seen"],
            "unrecognized arguments: --save-preprocessed seen (options are written with _: --save_preprocessed; "
            "see --help)",
        ),
        (
            "export",
            ["--normalised-input"],
            "unrecognized arguments: --normalised-input (options are written with _: --normalised_input; see --help)",
        ),
        ("serve", ["--port", "http"], "Parser key \"port\": Expected a <class 'int'>. Got value: http (see --help)"),
        ("evaluate", ["--data.mean", "x"], "Parser key \"data.mean\": Expected a <class 'float'>. Got value: x "
                                           "(see --help)"),
        ("predict", [], "the following arguments are required: inputs (see --help)"),
    ],
)  # fmt: skip
def test_a_mistake_on_the_command_line_is_one_line(name, args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_main(COMMANDS[name].cli_main, args)
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def print_config(main, args: list[str], path: Path, capsys) -> Path:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code == 0
    path.write_text(capsys.readouterr().out)
    return path


def test_print_config_then_config_reproduces_an_evaluation(trained_ckpt, tmp_path, capsys):
    args = ["--ckpt_path", str(trained_ckpt), "--data.eval_batch_size", "7", "--output", str(tmp_path / "a.json")]
    config = print_config(evaluate.cli_main, args, tmp_path / "evaluate.yaml", capsys)
    assert "eval_batch_size: 7" in config.read_text() and not (tmp_path / "a.json").exists()
    again = evaluate.cli_main(["--config", str(config)])
    assert again == evaluate.cli_main(args) and again["data"]["eval_batch_size"] == 7
    assert (tmp_path / "a.json").read_text() and not list(trained_ckpt.parent.glob("*.eval.json"))


def test_print_config_then_config_reproduces_a_prediction(trained_ckpt, mnist_pngs, tmp_path, capsys):
    args = [str(mnist_pngs / "03.png"), str(mnist_pngs), "--ckpt_path", str(trained_ckpt), "--batch_size", "4"]
    config = print_config(predict.cli_main, [*args, "--output", str(tmp_path / "p.csv")], tmp_path / "p.yaml", capsys)
    assert not (tmp_path / "p.csv").exists()
    again = predict.cli_main(["--config", str(config)])
    assert len(again) == 21 and again == predict.cli_main(args)
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 22


@pytest.mark.parametrize("word", ["best", "last"])
def test_best_and_last_mean_the_newest_runs_checkpoints_in_every_command(word, runs, mnist_pngs, served, capsys):
    """The trained network (best) reads the digits well; the one saved as last reads every digit as 0."""
    ckpt = runs[word]
    result = evaluate.cli_main(["--ckpt_path", word])
    assert result["checkpoint"] == str(ckpt) and (result["accuracy"] > 0.5) == (word == "best")
    assert capsys.readouterr().out.startswith(f"checkpoint  {ckpt}\n")
    assert ckpt.with_name(ckpt.stem + ".eval.json").is_file()  # beside the checkpoint used

    digits = [row["digit"] for row in predict.cli_main(["--ckpt_path", word, str(mnist_pngs)])]
    assert (digits == [0] * 20) == (word == "last")
    assert capsys.readouterr().err == f"note: --ckpt_path {word} is {ckpt}\n"

    export.cli_main(["--ckpt_path", word, "--format", "torchscript"])
    assert capsys.readouterr().out.startswith(f"wrote {ckpt.with_suffix('.pt')} (torchscript, ")
    pixels = load_split(Path(result["data"]["data_dir"]) / "MNIST" / "raw", "test")[0][:20].float()
    logits, _ = torch.jit.load(ckpt.with_suffix(".pt"))(pixels)  # and the calibrated probabilities
    assert logits.argmax(1).tolist() == digits

    server.cli_main(["--ckpt_path", word, "--port", "0"])
    assert capsys.readouterr().out.startswith(f"serving {ckpt} at http://127.0.0.1:")
    assert len(served) == 1


def test_best_is_the_default_of_every_command(runs, mnist_pngs, served, capsys):
    assert evaluate.cli_main([])["checkpoint"] == str(runs["best"])
    predict.cli_main([str(mnist_pngs / "00.png")])
    assert capsys.readouterr().err == f"note: --ckpt_path best is {runs['best']}\n"
    export.cli_main(["--format", "torchscript", "--output", "m.pt"])
    assert "wrote m.pt (torchscript, " in capsys.readouterr().out and Path("m.pt").is_file()
    server.cli_main(["--port", "0"])
    assert capsys.readouterr().out.startswith(f"serving {runs['best']} at ")


def test_cors_origins_and_allowed_hosts_take_one_word_or_a_list(trained_ckpt, served):
    ckpt = ["--ckpt_path", str(trained_ckpt), "--port", "0"]
    server.cli_main([*ckpt, "--cors_origins", "https://a.example", "--allowed_hosts", "API.example"])
    server.cli_main([*ckpt, "--cors_origins", "[https://a.example,https://b.example]", "--allowed_hosts", "[a,b]"])
    server.cli_main(ckpt)
    assert [made["cors_origins"] for made in served] == [
        ["https://a.example"],
        ["https://a.example", "https://b.example"],
        [],
    ]
    assert [{"api.example", "a", "b"} & made["hosts"] for made in served] == [{"api.example"}, {"a", "b"}, set()]


@pytest.mark.parametrize("blocked", ["uvicorn", "fastapi"])
def test_serve_without_its_extra_says_what_to_install(blocked, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, blocked, None)  # what importing a package that is not installed meets
    monkeypatch.delitem(sys.modules, "mnist_lightning.serve.app")  # imported afresh, so that it meets it too
    with pytest.raises(SystemExit):
        run_main(server.cli_main, ["--ckpt_path", "missing.ckpt"])  # said before the checkpoint is looked at
    assert (
        capsys.readouterr().err
        == f"error: serving needs {blocked}, not installed: pip install 'mnist-lightning[serve]'\n"
    )


@pytest.mark.parametrize(
    "blocked, message",
    [
        ("onnx", "ONNX export failed (Module onnx is not installed!)"),
        ("onnxruntime", "checking an ONNX export needs onnxruntime"),
    ],
)
def test_export_without_its_extra_says_what_to_install(blocked, message, trained_ckpt, tmp_path):
    code = f"import sys; sys.modules[{blocked!r}] = None; from mnist_lightning.export import main; main()"
    out = tmp_path / "m.onnx"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--ckpt_path", str(trained_ckpt), "--output", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr == f"error: {message}; pip install -e '.[export]'\n"
    assert not out.exists()


@pytest.mark.slow
def test_the_console_script_runs_predict_as_python_m_does(trained_ckpt, mnist_pngs, tmp_path):
    script = Path(sys.executable).with_name("mnist-lightning")
    if not script.is_file():
        pytest.skip(f"{script} is not installed: pip install -e .")
    args = ["--ckpt_path", str(trained_ckpt), str(mnist_pngs)]
    as_module = run_module("mnist_lightning.predict", *args, cwd=tmp_path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    as_script = subprocess.run([script, "predict", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (
        as_script.returncode == 0 and as_script.stdout == as_module.stdout and len(as_module.stdout.splitlines()) == 20
    )
    usage = subprocess.run([script, "predict", "--help"], env=env, capture_output=True, text=True).stdout
    assert usage.startswith("usage: mnist-lightning predict [--config CONFIG]")
    wrong = subprocess.run([script, "predict", "--batch-size", "8", "x.png"], env=env, capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "--batch_size; see --help" in wrong.stderr
