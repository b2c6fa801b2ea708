"""Lightning's own cost per training step, with nothing else in it: ``python benchmarks/overhead.py``.

A 1x1 linear layer at batch 1 makes the model's work negligible, so what a Trainer step costs beyond
the same plain PyTorch loop is Lightning's loop machinery: hooks, the optimizer closure, progress
bookkeeping, and (last row) a logger, checkpointing and the model summary callbacks. The third row is
the bare Trainer as ``mnist_lightning.fit`` sets it up on a machine without a GPU: no NVML probe per
optimizer step, and its ``NoProfiler``. The plain loop runs without the NVML probe too, as plain
PyTorch does (Lightning's import turns it on).
"""

import argparse
import logging
import os
import tempfile
import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from mnist_lightning.fit import NoProfiler


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000, help="steps per epoch")
    steps = parser.parse_args().steps
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    data = DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)
    lightning_nvml = os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]  # "1", set by Lightning's import
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for (x,) in data:
        optimizer.zero_grad()
        model.training_step((x,), 0).backward()
        optimizer.step()
    print(f"{'plain loop:':40} {(time.perf_counter() - start) / steps * 1e6:6.1f} us/step")
    bare = dict(logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    full = dict(enable_progress_bar=False)
    rows = (
        ("Trainer, no logger or callbacks", bare, lightning_nvml),
        ("the same, set up as fit does", dict(bare, profiler=NoProfiler()), "0"),
        ("Trainer, logger + checkpoint + summary", full, lightning_nvml),
    )
    for name, options, nvml in rows:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as root:  # the logger's and checkpoints' files, not kept
            trainer = L.Trainer(max_epochs=2, callbacks=[timer], default_root_dir=root, **options)
            trainer.fit(Tiny(), data)
        print(f"{name + ':':40} {timer.us:6.1f} us/step (second epoch)")


if __name__ == "__main__":
    main()
