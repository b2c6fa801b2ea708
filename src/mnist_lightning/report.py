"""What fit shows in TensorBoard besides curves: the HPARAMS table and pictures of the test results."""

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_lightning.evaluate import per_class

CELL = 28  # pixels per confusion-matrix cell and per (upscaled) digit
MISTAKES_SHOWN = 64  # misread test digits pictured


def log_hparams(logger: TensorBoardLogger, params: dict, metric_names: list[str]) -> None:
    """Register the run in the HPARAMS tab, which shows each metric's last logged value.

    TensorBoardLogger.log_hyperparams would also log the metrics once at step 0 as placeholders,
    which would put a false first point on their curves; so the three summaries are written here.
    """
    flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}
    for summary in hparams(flat, dict.fromkeys(metric_names, 0.0)):
        logger.experiment._get_file_writer().add_summary(summary)


def _canvas(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (width, height), "white")
    return image, ImageDraw.Draw(image)


def confusion_image(matrix: torch.Tensor) -> np.ndarray:
    """The confusion matrix as a heat map with counts: rows true digit, columns predicted (HWC uint8)."""
    counts = matrix.cpu().numpy()
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    image, draw = _canvas(CELL * 11, CELL * 11)
    font = ImageFont.load_default(size=10)
    for d in range(10):  # axis labels: true down the left, predicted along the top
        draw.text((4, CELL * (d + 1) + 9), str(d), fill="black", font=font)
        draw.text((CELL * (d + 1) + 11, 9), str(d), fill="black", font=font)
    for t in range(10):
        for p in range(10):
            shade = int(255 - 150 * share[t, p])  # light enough for black digits on top
            box = (CELL * (p + 1), CELL * (t + 1), CELL * (p + 2) - 1, CELL * (t + 2) - 1)
            draw.rectangle(box, fill=(shade, shade, 255) if t == p else (255, shade, shade))
            if counts[t, p]:
                draw.text((box[0] + 2, box[1] + 9), str(int(counts[t, p])), fill="black", font=font)
    return np.asarray(image)


def mistakes_image(images: torch.Tensor, true: torch.Tensor, predicted: torch.Tensor, columns: int = 8) -> np.ndarray:
    """Misread digits in a grid, each captioned ``true>predicted`` (HWC uint8)."""
    rows = max(1, -(-len(images) // columns))
    image, draw = _canvas(columns * 2 * CELL, rows * (2 * CELL + 14))
    font = ImageFont.load_default(size=11)
    for i, (x, t, p) in enumerate(zip(images.cpu(), true.tolist(), predicted.tolist(), strict=True)):
        x = x.reshape(28, 28)
        pixels = ((x - x.min()) / (x.max() - x.min() + 1e-8) * 255).byte().numpy()  # whatever the normalisation
        digit = Image.fromarray(255 - pixels).resize((2 * CELL, 2 * CELL), Image.NEAREST)
        left, top = (i % columns) * 2 * CELL, (i // columns) * (2 * CELL + 14)
        image.paste(digit, (left, top))
        draw.text((left + 18, top + 2 * CELL), f"{t}>{p}", fill="red", font=font)
    return np.asarray(image)


class HParams(Callback):
    """Registers the run in TensorBoard's HPARAMS tab, with the model's and the data's settings."""

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        if isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero:
            data = trainer.datamodule.hparams if trainer.datamodule else {}
            params = {
                f"{group}/{k}": v
                for group, hp in (("model", pl_module.hparams), ("data", data))
                for k, v in hp.items()
                if not k.startswith("_")  # LightningCLI's bookkeeping, not a hyperparameter
            }
            log_hparams(trainer.logger, params, ["val/acc_best", "test/acc"])


class TestPictures(Callback):
    """Per-digit test accuracy, and in TensorBoard the confusion matrix and the first misread digits."""

    def on_test_start(self, trainer: Trainer, pl_module) -> None:
        # validate_args=False: the argument checks would sync with the device on every update.
        self.confusion = MulticlassConfusionMatrix(10, validate_args=False).to(pl_module.device)
        self.mistakes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.shown = 0

    def on_test_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x, y = batch
        predicted = outputs.argmax(1)
        self.confusion.update(predicted, y)
        if self.shown < MISTAKES_SHOWN:
            wrong = predicted != y
            self.mistakes.append((x[wrong], y[wrong], predicted[wrong]))
            self.shown += len(self.mistakes[-1][1])  # a host sync, on the first batches only

    def on_test_epoch_end(self, trainer: Trainer, pl_module) -> None:
        matrix = self.confusion.compute()  # summed over DDP ranks
        for digit, accuracy in enumerate(per_class(matrix)["recall"].float()):
            pl_module.log(f"test/acc_digit_{digit}", accuracy, sync_dist=True)  # equal on every rank already
        if isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero:
            log_test_pictures(trainer.logger.experiment, matrix, self.mistakes, trainer.global_step)
        self.mistakes.clear()


def log_test_pictures(
    writer: SummaryWriter, matrix: torch.Tensor, mistakes: list[tuple[torch.Tensor, ...]], step: int
) -> None:
    """The test's confusion matrix, and its first MISTAKES_SHOWN misread digits from (images, true, predicted)."""
    writer.add_image("test/confusion_matrix", confusion_image(matrix), step, dataformats="HWC")
    if mistakes:
        images, true, predicted = (torch.cat(part)[:MISTAKES_SHOWN] for part in zip(*mistakes, strict=True))
        grid = mistakes_image(images, true, predicted)
        writer.add_image("test/mistakes_true>predicted", grid, step, dataformats="HWC")
