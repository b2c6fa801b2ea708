"""Where a checkpoint fails on the test set: ``python -m mnist_lightning.evaluate [--ckpt_path best] [--help]``.

Prints accuracy and loss, calibration (expected calibration error and median top-1 probability, before and
after the checkpoint's temperature), per-class accuracy, precision and recall, and the confusion matrix, and writes
them to JSON (by default ``<checkpoint>.eval.json`` beside the checkpoint). The ``--data.*`` options that
concern the test set work as in fit; those left out are the checkpoint's. Only torch is imported, not
Lightning, and only the test files are read. ``--verbose`` shows an error's traceback.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from mnist_lightning import calibration
from mnist_lightning.cli import command
from mnist_lightning.errors import UserError, run_main
from mnist_lightning.files.checkpoints import load_checkpoint, resolve_checkpoint
from mnist_lightning.files.idx import STATS, load_split, raw_dir
from mnist_lightning.files.outputs import write_output
from mnist_lightning.net import normalise

# For a checkpoint that lacks one of them: fit's defaults.
FIT_DEFAULTS = {
    "data_dir": "data",
    "dataset": "mnist",
    "eval_batch_size": 1000,
    "mean": STATS["mnist"][0],
    "std": STATS["mnist"][1],
}


@dataclass(frozen=True)
class DataOptions:
    """fit's --data.* options that concern the test set; the training batch would do nothing here.

    Args:
        data_dir: folder holding MNIST/raw/ (FashionMNIST/raw/ for fashion_mnist)
        dataset: which data set's test split
        eval_batch_size: images per model call
        mean: pixel mean used for normalisation
        std: pixel standard deviation used for normalisation
    """

    data_dir: str | None = None
    dataset: Literal["mnist", "fashion_mnist"] | None = None
    eval_batch_size: int | None = None
    mean: float | None = None
    std: float | None = None


def evaluate(net, data: dict, label_smoothing: float = 0.0, temperature: float = 1.0) -> dict:
    """Run the test set through the network; every per-class figure comes from the confusion matrix."""
    images, labels = load_split(raw_dir(data["data_dir"], data["dataset"]), "test")
    matrix, loss, kept = torch.zeros(10, 10, dtype=torch.long), 0.0, []
    with torch.inference_mode():
        for x, y in zip(images.split(data["eval_batch_size"]), labels.split(data["eval_batch_size"]), strict=True):
            logits = net(normalise(x, data["mean"], data["std"]))
            kept.append(logits)  # 10k rows of 10, for the calibration figures
            # Rows: true class, columns: predicted class.
            matrix += torch.bincount(y * 10 + logits.argmax(1), minlength=100).view(10, 10)
            loss += float(F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="sum"))
    classes = {k: v.tolist() for k, v in per_class(matrix).items()}
    per_class_rows = [
        {
            "class": c,
            "images": int(classes["images"][c]),
            "predicted": int(classes["predicted"][c]),
            "correct": int(classes["correct"][c]),
            "accuracy": none_if_nan(classes["recall"][c]),  # a class's accuracy is its recall
            "precision": none_if_nan(classes["precision"][c]),
            "recall": none_if_nan(classes["recall"][c]),
        }
        for c in range(10)
    ]
    return {
        "images": len(labels),
        "accuracy": int(matrix.diag().sum()) / len(labels),
        "loss": loss / len(labels),
        "calibration": calibration.summary(torch.cat(kept), labels, temperature),
        "per_class": per_class_rows,
        "confusion_matrix": matrix.tolist(),
    }


def per_class(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each class's figures from a confusion matrix (rows: true class, columns: predicted).

    A class's accuracy is the share of its images read correctly, which is its recall. Recall is NaN
    for a class with no images, precision for a class never predicted.
    """
    matrix = matrix.double()
    correct, images, predicted = matrix.diag(), matrix.sum(1), matrix.sum(0)
    return {
        "images": images,
        "predicted": predicted,
        "correct": correct,
        "recall": correct / images,
        "precision": correct / predicted,
    }


def none_if_nan(x: float) -> float | None:
    return None if x != x else x


def report(result: dict) -> str:
    """The figures as a plain-text report."""

    def figure(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = [
        f"checkpoint  {result['checkpoint']}",
        f"test set    {result['images']} images of {result['data']['dataset']} in {result['data']['data_dir']}",
        f"accuracy    {result['accuracy']:.4f}",
        f"loss        {result['loss']:.4f}  (with the label smoothing of training, as fit's test/loss)",
        "",
        *calibration_lines(result["calibration"]),
        "",
        "class  images  accuracy/recall  precision",
        *(
            f"{r['class']:>5}  {r['images']:>6}  {figure(r['recall']):>15}  {figure(r['precision']):>9}"
            for r in result["per_class"]
        ),
        "",
        "confusion matrix: rows are the true class, columns the predicted one",
        "true\\pred " + "".join(f"{c:>6}" for c in range(10)),
        *(f"{t:>9} " + "".join(f"{n:>6}" for n in row) for t, row in enumerate(result["confusion_matrix"])),
    ]
    return "\n".join(lines)


def calibration_lines(figures: dict) -> list[str]:
    """Before and after the temperature: ECE, median top-1 probability (against the accuracy), plain NLL."""
    before, after = figures["uncalibrated"], figures["calibrated"]
    return [
        f"calibration: temperature {figures['temperature']:.4f}, fitted on the validation images (1: none)",
        "                          softmax(logits)  softmax(logits / T)",
        f"ECE, 15 bins              {before['ece']:>15.4f}  {after['ece']:>19.4f}",
        f"median top-1 probability  {before['median_confidence']:>15.4f}  {after['median_confidence']:>19.4f}"
        f"  (accuracy {figures['accuracy']:.4f})",
        f"NLL, no smoothing         {before['nll']:>15.4f}  {after['nll']:>19.4f}",
    ]


def evaluate_checkpoint(ckpt_path: str = "best", data: DataOptions = DataOptions(), output: Path | None = None) -> dict:
    """Where a checkpoint fails on the test set: accuracy, loss, calibration, per-class figures, the confusion matrix.

    Args:
        ckpt_path: best or last (the newest run's under ./lightning_logs), or a checkpoint written by fit
        data: the test set; each option left out is the checkpoint's
        output: JSON file to write the figures to (default: beside the checkpoint, CKPT.eval.json)
    """
    path = resolve_checkpoint(ckpt_path)
    net, _, saved = load_checkpoint(path)
    given = {k: v for k, v in asdict(data).items() if v is not None}
    settings = {k: saved["data"].get(k, default) for k, default in FIT_DEFAULTS.items()} | given
    if settings["eval_batch_size"] <= 0:
        raise UserError(f"eval_batch_size must be positive, got {settings['eval_batch_size']}")
    if not settings["std"] > 0:
        raise UserError(f"std must be positive, got {settings['std']}")
    label_smoothing = saved["model"].get("label_smoothing", 0.0)
    figures = evaluate(net, settings, label_smoothing, saved["temperature"])
    result = {"checkpoint": str(path), "data": settings, **figures}
    print(report(result))
    output = output or path.with_name(path.stem + ".eval.json")
    write_output(output, json.dumps(result, indent=2) + "\n", made_from=path)
    print(f"\nwrote {output}")
    return result


def cli_main(args: list[str] | None = None) -> dict:
    """Parse the command line, evaluate, print and write the figures; returns what the JSON holds."""
    return command(evaluate_checkpoint, args, "evaluate")


def main() -> None:
    run_main(cli_main)


if __name__ == "__main__":
    main()
