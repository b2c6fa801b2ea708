"""Lightning's own cost per training step, with nothing else in it: ``python benchmarks/overhead.py``.

A 1x1 linear layer at batch 1 makes the model's work negligible, so what a Trainer step costs beyond
the same plain PyTorch loop is Lightning's loop machinery: hooks, the optimizer closure, progress
bookkeeping, and (second row) a logger, checkpointing and the model summary callbacks.
"""

import logging
import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

STEPS = 4000


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class StepTimer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.us = (time.perf_counter() - self.start) / trainer.num_training_batches * 1e6


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    data = DataLoader(TensorDataset(torch.zeros(STEPS, 1)), batch_size=1)
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for (x,) in data:
        optimizer.zero_grad()
        model.training_step((x,), 0).backward()
        optimizer.step()
    print(f"plain loop:                              {(time.perf_counter() - start) / STEPS * 1e6:6.1f} us/step")
    bare = dict(logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    full = dict(enable_progress_bar=False)
    for name, options in (("Trainer, no logger or callbacks", bare), ("Trainer, logger + checkpoint + summary", full)):
        timer = StepTimer()
        trainer = L.Trainer(max_epochs=2, callbacks=[timer], default_root_dir="/tmp/overhead", **options)
        trainer.fit(Tiny(), data)
        print(f"{name + ':':36} {timer.us:6.1f} us/step (second epoch)")


if __name__ == "__main__":
    main()
