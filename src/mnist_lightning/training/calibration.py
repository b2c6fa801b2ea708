"""The temperature every checkpoint carries: fitted on each validation epoch's logits (calibration.py)."""

import time

import torch
from lightning.pytorch import Callback, Trainer

from mnist_lightning.calibration import fit_temperature


class TemperatureScaling(Callback):
    """Fits the temperature on the validation images at the end of each validation epoch and writes it into
    every checkpoint as ``checkpoint["temperature"]``, so the best checkpoint carries the one fitted with its
    own weights. Only validation batches are seen: never a training or test image.

    The logits are kept as the epoch runs (5k rows of 10 for the default split) and, under DDP, gathered from
    every rank's unpadded shard, so each rank fits the same T on each validation image once.
    """

    def __init__(self):
        self.temperature: float | None = None  # None until a validation epoch is fitted: the checkpoint says so
        self.rows, self.seconds = 0, 0.0  # what the last fit saw and cost, for tests and benchmarks
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module) -> None:
        self.logits.clear()
        self.labels.clear()

    def on_validation_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.logits.append(outputs.detach())  # validation_step returns the batch's logits
        self.labels.append(batch[1])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module) -> None:
        if trainer.sanity_checking:  # two batches, and weights nobody will save
            return
        start = time.perf_counter()
        logits = torch.cat(self.logits) if self.logits else torch.zeros(0, 10, device=pl_module.device)
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long, device=pl_module.device)
        if trainer.world_size > 1:
            logits, labels = gather_rows(trainer, logits.float(), labels.long())
        self.logits.clear()
        self.labels.clear()
        if len(labels):
            self.temperature, self.rows = fit_temperature(logits.cpu(), labels.cpu()), len(labels)
        self.seconds = time.perf_counter() - start

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        if self.temperature is not None:
            checkpoint["temperature"] = self.temperature

    def on_load_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        # A resume goes on with the run's temperature; the final test, with the best checkpoint's.
        self.temperature = checkpoint.get("temperature")


def gather_rows(trainer: Trainer, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's rows, rank by rank. all_gather needs equal shapes: each rank pads to the longest
    shard, and the padding is cut off again."""
    counts = trainer.strategy.all_gather(torch.tensor(len(tensors[0]), device=tensors[0].device)).tolist()
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros(max(counts), *tensor.shape[1:])
        padded[: len(tensor)] = tensor
        parts = trainer.strategy.all_gather(padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)]))
    return gathered


def temperature_of(trainer: Trainer) -> float | None:
    """The temperature of the fit's TemperatureScaling, if it has one and it was fitted."""
    return next((c.temperature for c in trainer.callbacks if isinstance(c, TemperatureScaling)), None)
