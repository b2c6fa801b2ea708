import numpy as np
import onnxruntime
import pytest
import torch

from mnist_lightning.errors import UserError
from mnist_lightning.export import cli_main
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.idx import load_split


@pytest.fixture(scope="module")
def pixels_and_logits(data_dir, trained_ckpt):
    """The synthetic test set as raw pixels, and what the PyTorch model makes of it: the logits and the
    calibrated probabilities, as predict and serve compute them."""
    images, _ = load_split(data_dir / "MNIST" / "raw", "test")
    model, (mean, std), saved = load_checkpoint(trained_ckpt)
    with torch.inference_mode():
        logits = model(images.float().div(255).sub(mean).div(std))
    assert saved["temperature"] != pytest.approx(1, abs=0.01)  # else the probabilities would prove nothing
    return images.float(), (logits, (logits / saved["temperature"]).softmax(1)), (mean, std)


def run_exported(kind: str, path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
        return tuple(map(torch.from_numpy, session.run(None, {session.get_inputs()[0].name: x.numpy()})))
    return torch.jit.load(path)(x)


@pytest.mark.parametrize("kind", ["onnx", "torchscript"])
def test_export_takes_raw_pixels_and_matches_pytorch_at_any_batch_size(
    kind, trained_ckpt, pixels_and_logits, tmp_path, capsys
):
    pixels, logits, _ = pixels_and_logits
    difference = cli_main(["--ckpt_path", str(trained_ckpt), "--format", kind, "--output", str(tmp_path / "m")])
    assert (
        0 <= difference < 1e-4
        and f"max abs difference from PyTorch on a batch of 7: {difference:.2e}" in capsys.readouterr().out
    )
    for batch in (1, len(pixels)):  # the export traced a batch of 2: the batch dimension is dynamic
        got = run_exported(kind, tmp_path / "m", pixels[:batch])
        for exported, pytorch in zip(got, logits, strict=True):  # the logits, then the calibrated probabilities
            assert (exported - pytorch[:batch]).abs().max() < 1e-4


def test_onnx_without_normalisation_takes_normalised_input(trained_ckpt, pixels_and_logits, tmp_path):
    pixels, logits, (mean, std) = pixels_and_logits
    cli_main(
        [
            "--ckpt_path",
            str(trained_ckpt),
            "--format",
            "onnx",
            "--output",
            str(tmp_path / "m.onnx"),
            "--normalised_input",
        ]
    )
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "normalised"
    got = session.run(None, {"normalised": pixels.div(255).sub(mean).div(std).numpy()})
    for exported, pytorch in zip(got, logits, strict=True):
        assert np.abs(exported - pytorch.numpy()).max() < 1e-4


def test_unwritable_output_is_one_clear_error(trained_ckpt, tmp_path):
    with pytest.raises(UserError, match=r"cannot write .*m.onnx \(No such file or directory\); pass --output"):
        cli_main(["--ckpt_path", str(trained_ckpt), "--format", "onnx", "--output", str(tmp_path / "no" / "m.onnx")])
