"""What fit prints: the closing lines that say where the run is and what to run next, figures as the
epoch lines show them, and Lightning's messages left out where they say nothing a user can act on."""

import logging
import os
import threading
import warnings
from pathlib import Path

import torch


def here(path) -> str:
    """A path as the user would type it: relative to the current folder if it is inside it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def closing_lines(result: dict, run: Path | None, smoothing: float, tensorboard: bool) -> str:
    """What a user needs at the end: the test figures, where the run is, and what to run next."""
    if "test/acc" in result:
        lines = [f"test/acc {result['test/acc']:.4f}  test/loss {result['test/loss']:.4f}"]
        if smoothing:
            # The loss against smoothed targets cannot reach 0: a perfect model scores their entropy.
            p = torch.tensor([1 - smoothing + smoothing / 10] + [smoothing / 10] * 9)
            lines[0] += (
                f" (with label smoothing {smoothing:g}; a perfect model scores {float(-(p * p.log()).sum()):.3f})"
            )
    else:
        lines = ["no test batches (--trainer.limit_test_batches 0): the run was not tested"]
    ckpt = result["best_model_path"]
    if run:
        lines.append(f"run         {here(run)}")
    if run and tensorboard:
        lines.append(f"TensorBoard tensorboard --logdir {here(run)}")
    if ckpt:
        lines += [
            f"evaluate    python -m mnist_lightning.evaluate --ckpt_path {here(ckpt)}",
            f"predict     python -m mnist_lightning.predict --ckpt_path {here(ckpt)} YOUR_IMAGES",
        ]
    return "\n".join(lines)


def figure(x: float) -> str:
    return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"  # a learning rate near its end


def quiet_event_writer(hook):
    def excepthook(args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            hook(args)

    return excepthook


def quiet_lightning() -> None:
    """Leave out Lightning's messages that say nothing a user of fit (or of a sweep's fits) can act on."""
    # cli_main hands LightningCLI sys.argv as its args, which Lightning would flag as args given twice.
    warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended to run from within Python.*")
    # The data already sits in memory (or on the GPU): worker processes would only add overhead.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # test(ckpt_path="best") takes the first ModelCheckpoint's best, ours unless --trainer.callbacks adds one.
    warnings.filterwarnings("ignore", ".*configured with multiple `ModelCheckpoint` callbacks.*")
    # Lightning 2.6's own pytree helper builds torch's LeafSpec, deprecated in newer torch.
    warnings.filterwarnings("ignore", r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # Resuming continues in the run's own checkpoint folder, which Lightning warns is not empty.
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
    # TensorBoard's writer thread prints its own traceback of a full disk, which the next write raises here.
    threading.excepthook = quiet_event_writer(threading.excepthook)
    # A warning is one line, without the path of the library file that raised it.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    # Lightning advertises its cloud logger on every fit, says that max_epochs was reached just before
    # the last epoch's line says so, and names the tested checkpoint twice.
    noise = ("💡 Tip", "`Trainer.fit` stopped: `max_epochs=", "Loaded model weights from the checkpoint at")
    noise += ("Loading `train_dataloader` to estimate number of stepping batches",)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not str(r.msg).startswith(noise))
