"""Where a checkpoint fails on the test set: ``python -m mnist_lightning.evaluate --ckpt_path PATH [--help]``.

Prints accuracy and loss, per-class accuracy, precision and recall, and the confusion matrix, and writes
them to JSON (by default ``<checkpoint>.eval.json`` beside the checkpoint). ``--data.*`` options work as
in fit, less the training batch's; their defaults are those the checkpoint was trained with. ``--verbose``
shows an error's traceback.
"""

import argparse
import inspect
import json
from pathlib import Path

import torch
from jsonargparse import ArgumentError, ArgumentParser
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_lightning.checkpoint import load_checkpoint
from mnist_lightning.data import MNISTDataModule
from mnist_lightning.errors import run_main, usage_error, write_output


def evaluate(model, data: MNISTDataModule) -> dict:
    """Run the test set through the model; every per-class figure comes from the confusion matrix."""
    data.prepare_data()
    data.setup("test")
    confusion, loss = MulticlassConfusionMatrix(10), MeanMetric()
    with torch.inference_mode():
        for x, y in data.test_dataloader():
            logits = model(x)
            confusion.update(logits, y)
            loss.update(model.loss(logits, y), weight=len(y))
    matrix = confusion.compute()  # rows: true class, columns: predicted class
    correct, images, predicted = matrix.diag().tolist(), matrix.sum(1).tolist(), matrix.sum(0).tolist()
    per_class = [
        {
            "class": c,
            "images": images[c],
            "predicted": predicted[c],
            "correct": correct[c],
            # A class's accuracy is the share of its images read correctly, which is its recall.
            "accuracy": correct[c] / images[c] if images[c] else None,
            "precision": correct[c] / predicted[c] if predicted[c] else None,
            "recall": correct[c] / images[c] if images[c] else None,
        }
        for c in range(10)
    ]
    return {
        "images": sum(images),
        "accuracy": sum(correct) / sum(images),
        "loss": float(loss.compute()),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


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


def cli_main(args: list[str] | None = None) -> dict:
    """Parse the command line, evaluate, print and write the figures; returns what the JSON holds."""
    # The checkpoint comes first: its data settings are the defaults of the --data.* options.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--ckpt_path")
    ckpt_path = early.parse_known_args(args)[0].ckpt_path
    parser = ArgumentParser(
        prog="python -m mnist_lightning.evaluate", description=__doc__.splitlines()[0], exit_on_error=False
    )
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by mnist_lightning.fit")
    parser.add_argument("--output", type=str | None, default=None, help="JSON file (default: beside the checkpoint)")
    # The training batch options would do nothing here: the test set goes by --data.eval_batch_size.
    training_only = {"batch_size", "batch_size_scope"}
    parser.add_class_arguments(MNISTDataModule, "data", skip=training_only)
    model = None
    if ckpt_path:
        model, _, saved = load_checkpoint(ckpt_path)
        known = inspect.signature(MNISTDataModule).parameters.keys() - training_only
        parser.set_defaults({f"data.{k}": v for k, v in saved.items() if k in known})
    try:
        config = parser.parse_args(args)
    except ArgumentError as err:
        raise usage_error(err) from None
    data = MNISTDataModule(**config.data.as_dict())
    result = {"checkpoint": config.ckpt_path, "data": config.data.as_dict(), **evaluate(model, data)}
    print(report(result))
    output = Path(config.output or Path(config.ckpt_path).with_name(Path(config.ckpt_path).stem + ".eval.json"))
    write_output(output, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {output}")
    return result


def main() -> None:
    run_main(cli_main)


if __name__ == "__main__":
    main()
