"""Ship a checkpoint: ``python -m mnist_lightning.export [--ckpt_path best] [--format onnx|torchscript] [--help]``.

The exported graph takes a float batch (N, 1, 28, 28) of raw 0-255 pixels and returns two outputs: the ten
``logits`` and the ten calibrated ``probabilities``, softmax(logits / T) with the checkpoint's temperature.
It normalises with the checkpoint's mean and std itself, unless ``--normalised_input`` leaves that out.
The export is loaded back and checked against PyTorch before it is written.
"""

import io
import math
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mnist_lightning.cli import command
from mnist_lightning.errors import UserError, run_main
from mnist_lightning.files.checkpoints import load_checkpoint, resolve_checkpoint
from mnist_lightning.files.outputs import write_output
from mnist_lightning.net import normalise

TOLERANCE = 1e-4  # on the logits and probabilities; float32 kernels of different runtimes differ by ~1e-6
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}


class RawPixels(nn.Module):
    """The network behind the normalisation it was trained with: 0-255 pixels in, logits out."""

    def __init__(self, net: nn.Module, mean: float, std: float):
        super().__init__()
        self.net, self.mean, self.std = net, mean, std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(normalise(pixels, self.mean, self.std))


class Calibrated(nn.Module):
    """The logits, first and as they were, and the calibrated probabilities: softmax(logits / T)."""

    def __init__(self, net: nn.Module, temperature: float):
        super().__init__()
        self.net, self.temperature = net, temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, (logits / self.temperature).softmax(1)


def to_onnx(module: nn.Module, example: torch.Tensor, input_name: str) -> bytes:
    with torch.inference_mode():
        outputs = module(example)
    # The logits, and the probabilities beside them if the module returns them (Calibrated does).
    names = ["logits", "probabilities"][: len(outputs) if isinstance(outputs, tuple) else 1]
    buffer = io.BytesIO()
    try:
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            input_names=[input_name],
            output_names=names,
            dynamic_axes={input_name: {0: "batch"}, **{name: {0: "batch"} for name in names}},
        )
    except torch.onnx.OnnxExporterError as err:
        raise UserError(f"ONNX export failed ({err}); pip install -e '.[export]'") from None
    return buffer.getvalue()


def run_onnx(exported: bytes, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking an ONNX export needs onnxruntime; pip install -e '.[export]'") from None
    session = onnxruntime.InferenceSession(exported, providers=["CPUExecutionProvider"])
    return tuple(map(torch.from_numpy, session.run(None, {session.get_inputs()[0].name: x.numpy()})))


def to_torchscript(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def run_torchscript(exported: bytes, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.jit.load(io.BytesIO(exported))(x)


def exported(ckpt_path: Path, kind: str, normalised_input: bool = False) -> tuple[bytes, float]:
    """The exported file's bytes and its max abs difference from PyTorch, logits and probabilities, on a
    batch of 7 random images."""
    net, (mean, std), saved = load_checkpoint(ckpt_path)
    module = Calibrated(net if normalised_input else RawPixels(net, mean, std), saved["temperature"])
    # Pixels that look like an image's, so the check exercises the normalisation as well.
    pixels = torch.randint(0, 256, (7, 1, 28, 28), generator=torch.Generator().manual_seed(0)).float()
    x = normalise(pixels, mean, std) if normalised_input else pixels
    with torch.inference_mode():
        expected = module(x)
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, and the ONNX exporter used here (the TorchScript
        # one, which unlike the dynamo one needs no onnxscript) says so too; both still work.
        warnings.filterwarnings("ignore", r".*torch\.jit.*is deprecated.*", FutureWarning)
        warnings.filterwarnings("ignore", ".*legacy TorchScript-based ONNX export.*", DeprecationWarning)
        # Traced with a batch of 2, checked with 7: the batch dimension must really be dynamic.
        if kind == "onnx":
            exported = to_onnx(module, x[:2], "normalised" if normalised_input else "pixels")
            got = run_onnx(exported, x)
        else:
            exported = to_torchscript(module)
            got = run_torchscript(exported, x)
    return exported, max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))


def export(
    ckpt_path: str = "best",
    format: Literal["onnx", "torchscript"] = "onnx",
    output: Path | None = None,
    normalised_input: bool = False,
) -> float:
    """Write the network as ONNX or TorchScript, checked against PyTorch; returns the max abs difference.

    Args:
        ckpt_path: best or last (the newest run's under ./lightning_logs), or a checkpoint written by fit
        format: onnx (needs the export extra) or torchscript
        output: file to write (default: beside the checkpoint, CKPT.onnx or CKPT.pt)
        normalised_input: leave out the normalisation: the inputs are normalised already
    """
    path = resolve_checkpoint(ckpt_path)
    output = output or path.with_suffix(SUFFIXES[format])
    data, difference = exported(path, format, normalised_input)
    if not math.isfinite(difference) or difference > TOLERANCE:
        raise UserError(
            f"the {format} export differs from PyTorch by up to {difference:.2e} (tolerance {TOLERANCE:.0e}); "
            "nothing was written"
        )
    write_output(output, data, made_from=path)
    print(f"wrote {output} ({format}, {len(data):,} bytes) from {path}")
    print(f"max abs difference from PyTorch on a batch of 7: {difference:.2e} (tolerance {TOLERANCE:.0e})")
    return difference


def cli_main(args: list[str] | None = None) -> float:
    """Export, check and write; returns the max abs difference from PyTorch."""
    return command(export, args, "export")


def main() -> None:
    run_main(cli_main)


if __name__ == "__main__":
    main()
