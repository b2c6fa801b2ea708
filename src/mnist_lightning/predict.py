"""Read digits in people's own images: ``python -m mnist_lightning.predict IMAGE_OR_DIR... [--ckpt_path best]``.

Each image is prepared the way MNIST's digits were (files/images.py) and read by the checkpoint's network;
the probabilities are calibrated, softmax(logits / T) with the checkpoint's temperature.
"""

import csv
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mnist_lightning.cli import command
from mnist_lightning.errors import UserError, run_main
from mnist_lightning.files.checkpoints import load_checkpoint, resolve_checkpoint
from mnist_lightning.files.images import read_image
from mnist_lightning.files.outputs import write_output
from mnist_lightning.net import normalise

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # what a folder is searched for


def find_images(inputs: list[str]) -> list[Path]:
    """Named files as given, folders searched recursively for image files, symlinked folders followed
    (each real folder once); what a folder holds besides images is counted on stderr, not silently dropped."""
    paths = []
    for name in map(Path, inputs):
        if not name.is_dir():
            paths.append(name)  # tried whatever its suffix; if missing, it fails with the other bad files
            continue
        found, skipped, seen = [], Counter(), set()
        for folder, subfolders, files in os.walk(name, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a symlink back up the tree, or two links to one folder
                subfolders.clear()
                continue
            seen.add(real)
            subfolders.sort()
            for file in map(Path(folder).joinpath, files):
                if file.suffix.lower() in SUFFIXES and file.is_file():
                    found.append(file)
                elif not file.name.startswith("."):
                    skipped[file.suffix.lower() or "no suffix"] += 1
        if skipped:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
            print(f"note: {name}: skipped what is not an image: {kinds}", file=sys.stderr)
        if not found:
            raise UserError(f"{name} holds no {', '.join(sorted(SUFFIXES))} files; name the images to read")
        paths += sorted(found)
    return paths


def predict(
    inputs: list[str],
    ckpt_path: str = "best",
    output: Path | None = None,
    save_preprocessed: Path | None = None,
    batch_size: int = 1024,
) -> list[dict]:
    """Read digits in your own images: one line each, the digit, its calibrated probability and the top three.

    Args:
        inputs: image files and folders (searched recursively)
        ckpt_path: best or last (the newest run's under ./lightning_logs), or a checkpoint written by fit
        output: also write the predictions to this .json or .csv file
        save_preprocessed: folder to write the 28x28 images the model saw to
        batch_size: images per model call
    """
    if output and output.suffix not in (".json", ".csv"):
        raise UserError(f"--output {output} must end in .json or .csv")
    if batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {batch_size}")
    ckpt = resolve_checkpoint(ckpt_path)
    if str(ckpt) != ckpt_path:  # said on stderr: stdout is the predictions' alone
        print(f"note: --ckpt_path {ckpt_path} is {ckpt}", file=sys.stderr)
    model, (mean, std), saved = load_checkpoint(ckpt)
    if save_preprocessed:
        try:
            save_preprocessed.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {save_preprocessed} ({err.strerror}); pick another folder") from None
    paths, predictions, failures = find_images(inputs), [], 0
    for start in range(0, len(paths), batch_size):
        batch, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(read_image(path))
                batch.append(path)
            except UserError as err:
                print(f"error: {path}: {err}", file=sys.stderr, flush=True)
                failures += 1
        if not batch:
            continue
        images = np.stack(images)
        with torch.inference_mode():
            logits = model(normalise(torch.from_numpy(images).unsqueeze(1), mean, std))
            top = (logits / saved["temperature"]).softmax(1).topk(3)
        columns = (batch, images, top.values.tolist(), top.indices.tolist(), logits.tolist())
        for path, image, probs, digits, raw in zip(*columns, strict=True):
            top3 = list(zip(digits, probs, strict=True))
            row = {"path": str(path), "digit": digits[0], "probability": probs[0], "top3": top3, "logits": raw}
            print(f"{path}  {digits[0]}  {probs[0]:.3f}  top3 " + " ".join(f"{d}:{p:.3f}" for d, p in top3))
            if save_preprocessed:
                Image.fromarray(image).save(save_preprocessed / f"{len(predictions):05d}_{path.stem}.png")
            predictions.append(row)
    if output:
        write(output, predictions)
    if failures:
        raise UserError(f"{failures} of {len(paths)} files could not be read (listed above); the rest were predicted")
    return predictions


def write(path: Path, predictions: list[dict]) -> None:
    if path.suffix == ".json":
        write_output(path, json.dumps(predictions, indent=2))
        return
    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(["path", "digit", "probability", "digit2", "probability2", "digit3", "probability3"])
    for row in predictions:
        out.writerow([row["path"], *(x for pair in row["top3"] for x in pair)])
    # A file name that is not UTF-8 (Python holds its bytes as surrogates) is written as its own bytes,
    # as ls prints it, rather than crash the writer.
    write_output(path, text.getvalue().encode("utf-8", "surrogateescape"))


def cli_main(args: list[str] | None = None) -> list[dict]:
    """Predict every image, print one line each and return the predictions; failures end in a UserError."""
    return command(predict, args, "predict")


def main() -> None:
    run_main(cli_main)


if __name__ == "__main__":
    main()
