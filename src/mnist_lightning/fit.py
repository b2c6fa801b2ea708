"""Train, validate each epoch, test the best checkpoint: ``python -m mnist_lightning.fit [--help]``.

This is Lightning's whole story for the tutorial: the command line builds the model (model.py), the data
(data.py) and the Trainer (training/trainer.py says with what); ``trainer.fit`` runs the training loop
with a validation pass each epoch, ``trainer.test`` evaluates the best checkpoint, and ``metrics.json``
joins the run's TensorBoard events and checkpoints in ``lightning_logs/version_N/``.
"""

import json
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from mnist_lightning.data import MNISTDataModule
from mnist_lightning.errors import run_main
from mnist_lightning.files import runs
from mnist_lightning.model import MNISTClassifier
from mnist_lightning.training import console, speedups
from mnist_lightning.training.trainer import build


def cli_main(args: list[str] | None = None, callbacks: tuple[Callback, ...] = ()) -> dict:
    """Parse the command line, train, test the best checkpoint; returns what ``metrics.json`` holds."""
    cli = build(MNISTClassifier, MNISTDataModule, list(sys.argv[1:] if args is None else args), callbacks)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    with runs.stopped_cleanly(trainer, cli.claimed):  # SIGTERM, a full disk: one line saying how to resume
        # weights_only: a checkpoint never runs code when it is loaded, here or for the test below.
        trainer.fit(model, datamodule=data, ckpt_path=cli.config.ckpt_path, weights_only=True)
        fit_seconds = time.perf_counter() - start
        # A resume of a run stopped in its final test trains nothing: its figures come from the checkpoint.
        fitted = {**cli.timer.metrics, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        tested = trainer.test(
            model, datamodule=data, ckpt_path="best" if best else None, verbose=False, weights_only=True
        )
    result = {
        **fitted,
        **(tested[0] if tested else {}),  # none with --trainer.limit_test_batches 0
        "best_model_path": best or None,
        "fit_seconds": fit_seconds,
        "epoch_seconds": cli.timer.seconds,
        "global_step": trainer.global_step,
        "threads": torch.get_num_threads(),  # part of what the seed reproduces (cli.threads)
        # Under ddp_spawn the data lived in the spawned processes only.
        "train_samples": len(data.train_set) if hasattr(data, "train_set") else None,
        "config": json.loads(cli.parser.dump(cli.config, format="json", skip_check=True)),
    }
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    if trainer.is_global_zero:
        if log_dir:
            runs.write_metrics(Path(log_dir), result)
        tensorboard = isinstance(trainer.logger, TensorBoardLogger)
        smoothing = model.hparams.label_smoothing
        print(console.closing_lines(result, Path(log_dir) if log_dir else None, smoothing, tensorboard))
    return result


def main() -> None:
    console.quiet_lightning()
    try:
        run_main(cli_main)
    finally:
        speedups.exit_without_gc()


if __name__ == "__main__":
    main()
