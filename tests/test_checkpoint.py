import json
import os
import random
import shlex
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import run_module
from mnist_lightning import evaluate, export, predict
from mnist_lightning.errors import UserError, run_main
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.idx import STATS
from mnist_lightning.model import MNISTClassifier


class RunsACommand:
    """Unpickling this runs a shell command: the kind of payload a downloaded checkpoint may carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def written(path, content: bytes | dict | torch.Tensor):
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    return path


def real(ckpt) -> dict:
    return torch.load(ckpt, weights_only=True)


def with_state(ckpt, state: dict, **hparams) -> dict:
    checkpoint = real(ckpt)
    checkpoint["state_dict"] = state
    checkpoint["hyper_parameters"].update(hparams)
    return checkpoint


def nan_bias(ckpt) -> dict:
    state = real(ckpt)["state_dict"]
    state["net.5.bias"][3] = float("nan")
    return with_state(ckpt, state)


def rotted(ckpt) -> bytes:
    """One bit flipped inside the first layer's weights, the zip's CRCs left as they were."""
    raw = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(ckpt) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    name_length, extra_length = struct.unpack("<HH", raw[member.header_offset + 26 : member.header_offset + 30])
    raw[member.header_offset + 30 + name_length + extra_length + 1000] ^= 0x10
    return bytes(raw)


def bomb(ckpt) -> bytes:
    """A member whose central-directory entry declares 4 GB: what a zip bomb's says, before inflating."""
    raw = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(ckpt) as archive:
        member = archive.infolist()[0]
    entry = raw.index(b"PK\x01\x02")  # the first member's central-directory entry
    assert raw[entry + 46 : entry + 46 + len(member.filename)] == member.filename.encode()
    raw[entry + 24 : entry + 28] = struct.pack("<I", 2**32 - 1)
    return bytes(raw)


def with_data(ckpt, **data) -> dict:
    checkpoint = real(ckpt)
    checkpoint["datamodule_hyper_parameters"].update(data)
    return checkpoint


# Each case: what to write in place of the good checkpoint, and what the message must say.
CASES = {
    "missing": (lambda ckpt: None, "does not exist"),
    "empty": (lambda ckpt: b"", "is empty"),
    "random bytes": (lambda ckpt: random.Random(0).randbytes(5000), "truncated, corrupt or not a PyTorch checkpoint"),
    "text": (lambda ckpt: b"epoch: 3\nacc: 0.98\n", "truncated, corrupt or not a PyTorch checkpoint"),
    "truncated": (lambda ckpt: ckpt.read_bytes()[: ckpt.stat().st_size // 2], "truncated, corrupt"),
    "not a dict": (lambda ckpt: torch.zeros(3), "holds a Tensor, not a checkpoint"),
    "other project": (
        lambda ckpt: {"state_dict": {"conv.weight": torch.zeros(3)}, "hyper_parameters": {"lr": 0.1}},
        "is not from mnist_lightning",
    ),
    "other keys": (
        lambda ckpt: with_state(ckpt, {"fc.weight": torch.zeros(1)}),
        "holds another network .*missing net.1.bias, .*unexpected fc.weight",
    ),
    "other hidden sizes": (
        lambda ckpt: with_state(ckpt, MNISTClassifier(32, 16).state_dict(), hidden1=128, hidden2=64),
        r"net.1.weight: checkpoint \(32, 784\) vs model \(128, 784\); net.1.bias: checkpoint \(32,\)",
    ),
    "nan weights": (nan_bias, "NaN or infinite weights in net.5.bias"),
    "bit rot": (rotted, "is corrupt: archive/data/0 fails its CRC check"),
    "zip bomb": (bomb, r"bytes declare 4,29\d,\d{3},\d{3} bytes uncompressed \(a zip bomb\)"),
    "std 0": (lambda ckpt: with_data(ckpt, std=0.0), "normalises with mean 0.1307 and std 0.0, which would turn"),
    "nan mean": (lambda ckpt: with_data(ckpt, mean=float("nan")), "normalises with mean nan and std 0.3081"),
}


@pytest.fixture(params=CASES, ids=list(CASES))
def bad_ckpt(request, tmp_path, trained_ckpt):
    content, message = CASES[request.param]
    content = content(trained_ckpt)
    return tmp_path / "bad.ckpt" if content is None else written(tmp_path / "bad.ckpt", content), message


def test_loads_fits_checkpoint_in_eval_mode_with_its_normalisation(fit_result, trained_ckpt, data_dir):
    net, (mean, std), settings = load_checkpoint(trained_ckpt)
    data = settings["data"]
    # No --data.mean or --data.std given: the dataset's own, which the checkpoint carries.
    assert fit_result["config"]["data"].get("mean") is None
    assert not net.training and (mean, std) == STATS["mnist"] == (data["mean"], data["std"])
    assert data["data_dir"] == str(data_dir) and "_instantiator" not in data
    assert settings["model"]["label_smoothing"] == fit_result["config"]["model"]["label_smoothing"]
    weights = {k: v for k, v in real(trained_ckpt)["state_dict"].items() if k.startswith("net.")}
    assert weights.keys() == {f"net.{k}" for k in net.state_dict()}
    for name, tensor in weights.items():
        assert torch.equal(net.state_dict()[name.removeprefix("net.")], tensor), name


def test_the_network_is_built_from_the_checkpoints_hidden_sizes(tmp_path, trained_ckpt):
    small = with_state(trained_ckpt, MNISTClassifier(32, 16).state_dict(), hidden1=32, hidden2=16)
    path = written(tmp_path / "small.ckpt", small)
    net, _, _ = load_checkpoint(path)
    assert net[1].weight.shape == (32, 784) and net[3].weight.shape == (16, 32)


def test_bad_checkpoints_get_one_line_naming_the_file(bad_ckpt):
    path, message = bad_ckpt
    with pytest.raises(UserError, match=message) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"checkpoint {path} ") and "\n" not in str(err.value)


@pytest.mark.parametrize("module", [evaluate, predict, export])
def test_clis_exit_2_with_one_line_and_no_traceback(module, bad_ckpt, tmp_path, capsys):
    path, message = bad_ckpt
    args = {evaluate: [], predict: [str(tmp_path)], export: ["--format", "onnx", "--output", str(tmp_path / "m.onnx")]}
    with pytest.raises(SystemExit) as exit_:
        run_main(module.cli_main, ["--ckpt_path", str(path), *args[module]])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {path} ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def write_malicious(path, marker) -> None:
    torch.save({"state_dict": RunsACommand(f"touch {shlex.quote(str(marker))}")}, path)


def test_the_payload_works_when_trusted(tmp_path):
    # Proves the next tests meaningful: loaded without weights_only, this checkpoint runs its command.
    write_malicious(tmp_path / "evil.ckpt", tmp_path / "pwned")
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert (tmp_path / "pwned").exists()


def test_a_checkpoint_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path):
    write_malicious(tmp_path / "evil.ckpt", tmp_path / "pwned")
    with pytest.raises(UserError, match=r"refused as unsafe: loading it would run code \(.*posix.system"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_predict_refuses_the_malicious_checkpoint_from_the_command_line(tmp_path):
    write_malicious(tmp_path / "evil.ckpt", tmp_path / "pwned")
    proc = run_module("mnist_lightning.predict", "--ckpt_path", "evil.ckpt", ".", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: checkpoint evil.ckpt was refused as unsafe") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "pwned").exists()


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        load_checkpoint(tmp_path)


def test_ckpt_path_last_and_best_mean_the_same_in_every_command(tmp_path):
    """last: the newest run's last.ckpt; best: that run's best (metrics.json's, else its newest other .ckpt)."""
    from mnist_lightning.files.checkpoints import resolve_checkpoint

    def run(version: int, names: list[str], mtime: int) -> Path:
        folder = tmp_path / f"lightning_logs/version_{version}/checkpoints"
        folder.mkdir(parents=True)
        for i, name in enumerate(names):
            (folder / name).write_bytes(b"")
            os.utime(folder / name, (mtime + i, mtime + i))
        return folder

    older = run(3, ["best-epoch1-val_acc0.5.ckpt", "last.ckpt"], 1_000)
    newest = run(1, ["best-epoch1-val_acc0.6.ckpt", "best-epoch2-val_acc0.7.ckpt", "last.ckpt"], 5_000)
    run(2, [], 9_000)  # a run killed before its first checkpoint does not count
    assert resolve_checkpoint("last", tmp_path) == newest / "last.ckpt"  # newest by time, not by version
    assert resolve_checkpoint("best", tmp_path) == newest / "best-epoch2-val_acc0.7.ckpt"
    (newest.parent / "metrics.json").write_text(
        json.dumps({"best_model_path": str(newest / "best-epoch1-val_acc0.6.ckpt")})
    )
    assert resolve_checkpoint("best", tmp_path) == newest / "best-epoch1-val_acc0.6.ckpt"
    assert resolve_checkpoint("some/file.ckpt", tmp_path) == Path("some/file.ckpt")
    os.utime(older / "last.ckpt", (9_500, 9_500))
    assert resolve_checkpoint("best", tmp_path) == older / "best-epoch1-val_acc0.5.ckpt"
