"""MNISTDataModule: four IDX files -> one normalised tensor per split -> batches by index tensors."""

import contextlib
import io
import math
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_convert

from mnist_lightning.augment import translate
from mnist_lightning.errors import UserError
from mnist_lightning.files.idx import FILES, FOLDERS, STATS, load_split, present, raw_dir
from mnist_lightning.net import normalise


class TensorBatches(Dataset):
    """Images and labels held as two tensors; an index tensor picks a whole batch in one op."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | torch.Tensor):
        if isinstance(index, int):
            return self.images[index], self.labels[index]
        # index_select: half the time of images[index] on a CPU, for a batch of 64.
        return self.images.index_select(0, index), self.labels.index_select(0, index)

    def __getitems__(self, indices: list[int]):  # only a DataLoader that batches by itself calls this
        return self[torch.tensor(indices, device=self.labels.device)]


class DeviceBatches(DistributedSampler):
    """Yields whole batches of indices as slices of one tensor on the data's device: one host-to-device
    copy an epoch, none a step.

    A DistributedSampler even on one process, so that Lightning leaves it in place under DDP and calls
    ``set_epoch``: shuffled, every epoch reshuffles with seed + epoch, the same on every rank, each rank
    taking a disjoint shard, and the same again after a resume. Unshuffled (evaluation), the shards are
    left uneven instead of padded with repeated images, which would count some test images twice.
    """

    def __init__(self, dataset: TensorBatches, batch_size: int, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        if not shuffle:
            self.num_samples = len(range(rank, len(dataset), num_replicas))
            self.total_size = len(dataset)

    def __iter__(self):
        # A generator, so the order is drawn at the first batch, not when the iterator is made: Lightning
        # makes a run's first iterator before its set_epoch (and takes no batch until after it), so a
        # resumed run would otherwise replay epoch 0's order.
        order = torch.tensor(list(super().__iter__()), dtype=torch.long, device=self.dataset.labels.device)
        yield from order.split(self.batch_size) if len(order) else ()  # an empty split is one empty batch

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)


class MNISTDataModule(L.LightningDataModule):
    """Step 1, the data: MNIST (or Fashion-MNIST) held in memory, normalised once, split into train and val.

    Args:
        data_dir: folder holding ``MNIST/raw/`` (or ``FashionMNIST/raw/``); downloaded there if missing.
        dataset: ``mnist`` or ``fashion_mnist``.
        batch_size: samples per optimizer step, see ``batch_size_scope``.
        batch_size_scope: ``global`` splits ``batch_size`` over the DDP processes, so that any number
            of devices takes the same optimizer steps as one; ``device`` gives each process
            ``batch_size`` (the global batch, and the right learning rate, then grow with the devices).
        eval_batch_size: images per validation and test batch, on each process. Nothing is learned
            from them, so a larger batch only takes fewer steps; the epoch's loss and accuracy are sums,
            the same for any size.
        val_size: images held out of the 60k training set for validation.
        mean: pixel mean used for normalisation, pixels scaled to [0, 1] first; by default the dataset's own
            (of its 60k training images: MNIST 0.1307, Fashion-MNIST 0.2860).
        std: pixel standard deviation used for normalisation; by default the dataset's own (MNIST 0.3081,
            Fashion-MNIST 0.3530).
        split_seed: seed of the train/val split, independent of the training seed (0 to 2^63 - 1).
        shift: augmentation: move each training image by up to this many pixels down and across, a new
            draw each step (0: off). Validation and test images are never moved. 1 lifts the 5-epoch
            recipe by about 0.2 points (README, "Results").
    """

    def __init__(
        self,
        data_dir: str = "data",
        dataset: Literal["mnist", "fashion_mnist"] = "mnist",
        batch_size: int = 128,
        batch_size_scope: Literal["global", "device"] = "global",
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        mean: float | None = None,
        std: float | None = None,
        split_seed: int = 42,
        shift: int = 1,
    ):
        super().__init__()
        if dataset not in FOLDERS:
            raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(FOLDERS)}")
        for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not 0 < size < 2**63:  # torch's sizes are int64
                raise UserError(f"{name} must be positive (and under 2^63), got {size}")
        if not 0 <= val_size < 2**63:
            raise UserError(f"val_size must be 0 to 2^63 - 1, got {val_size}")
        if not 0 <= split_seed < 2**63:  # what a torch generator and TensorBoard's HPARAMS can hold
            raise UserError(f"split_seed must be 0 to 2^63 - 1, got {split_seed}")
        mean, std = (STATS[dataset][0] if mean is None else mean), (STATS[dataset][1] if std is None else std)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise UserError(f"mean must be finite and std positive, got {mean} and {std}")
        if not 0 <= shift < 28:
            raise UserError(f"shift must be 0 (off) to 27 pixels, got {shift}")
        self.save_hyperparameters()
        # The mean and std in use, not None: checkpoints carry them to evaluate, predict and serve.
        self.hparams.mean, self.hparams.std = mean, std
        self.raw_dir = raw_dir(data_dir, dataset)

    def prepare_data(self) -> None:
        """Download the four files if any is missing (Lightning runs this on one process per node)."""
        if all(present(self.raw_dir / name) for split in FILES.values() for name in split):
            return
        from torchvision import datasets  # only to download: it takes a second to import

        self.raw_dir.mkdir(parents=True, exist_ok=True)
        download = getattr(datasets, FOLDERS[self.hparams.dataset])
        # Download into a scratch folder and move whole files in, so a killed download or a
        # concurrent run never sees a half-written file. torchvision checks each archive's md5.
        with tempfile.TemporaryDirectory(dir=self.raw_dir) as tmp:
            try:
                with (
                    contextlib.redirect_stdout(io.StringIO()),
                    contextlib.redirect_stderr(io.StringIO()),
                ):
                    download(tmp, train=True, download=True)
                    download(tmp, train=False, download=True)
            except (RuntimeError, OSError) as err:
                names = ", ".join(name for split in FILES.values() for name in split)
                reason = str(err).strip().splitlines()[-1].strip()  # torchvision lists every mirror tried
                raise UserError(
                    f"{self.hparams.dataset} is not in {self.raw_dir}/ and could not be downloaded ({reason}). "
                    f"Put {names} there, or point --data.data_dir at the folder that holds "
                    f"{self.raw_dir.parent.name}/raw/"
                ) from None
            downloaded = Path(tmp) / self.raw_dir.parent.name / "raw"
            for split in FILES.values():
                for name in split:
                    shutil.move(downloaded / name, self.raw_dir / name)

    def setup(self, stage: str) -> None:
        """Decode the split a stage needs, move it to the training device, normalise it; for fit, split off
        the validation images, the same on every rank."""
        # With a GPU the whole set lives on it, and so does each epoch's order (see DeviceBatches).
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        mean, std, val_size = self.hparams.mean, self.hparams.std, self.hparams.val_size
        if stage in ("fit", "validate") and not hasattr(self, "train_set"):
            images, labels = load_split(self.raw_dir, "train")
            if val_size >= len(labels):
                raise UserError(f"val_size {val_size} leaves no training data: the set has {len(labels)} images")
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.hparams.split_seed))
            val, train = order[:val_size], order[val_size:]
            # Split the bytes, then normalise: the gather moves a quarter of the memory it would as floats.
            self.train_set = TensorBatches(
                normalise(images.index_select(0, train).to(device), mean, std), labels[train].to(device)
            )
            self.val_set = TensorBatches(
                normalise(images.index_select(0, val).to(device), mean, std), labels[val].to(device)
            )
            # The shuffle's seed, the same on every rank (which each take their shard of one order):
            # the run's seed, or with --seed_everything false a seed drawn on rank zero.
            seed = torch.initial_seed() % 2**63
            self.shuffle_seed = int(self.trainer.strategy.broadcast(seed)) if self.trainer else seed
        if stage in ("test", "predict") and not hasattr(self, "test_set"):
            images, labels = load_split(self.raw_dir, "test")
            self.test_set = TensorBatches(normalise(images.to(device), mean, std), labels.to(device))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # On the device, after the transfer, on the whole batch; training batches only (not the model
        # summary's example input, a lone tensor, which passes through here too), and not under
        # --trainer.overfit_batches, which checks that the network can learn a few batches by heart.
        if not (self.hparams.shift and self.trainer and self.trainer.training) or torch.is_tensor(batch):
            return batch
        if self.trainer.overfit_batches:
            return batch
        images, labels = batch
        if getattr(self, "_shifts", None) is None or self._shifts.device != images.device:
            self._shifts = torch.Generator(device=images.device)
            # A 0 pixel as normalise() makes it, to the bit: what the pixels moved in are filled with.
            self._background = float(normalise(torch.zeros(()), self.hparams.mean, self.hparams.std))
        # Seeded from the run's seed, the rank and the step, not drawn from a running stream: the same
        # shifts under the same seed, and again after a resume. (With accumulate_grad_batches, the
        # batches of one step draw the same shifts, for other images.)
        self._shifts.manual_seed(hash((self.shuffle_seed, self.trainer.global_rank, self.trainer.global_step)) % 2**63)
        return translate(images, self.hparams.shift, self._background, self._shifts), labels

    def _batch_size(self) -> int:
        world_size = self.trainer.world_size if self.trainer else 1
        if self.hparams.batch_size_scope == "device" or world_size == 1:
            return self.hparams.batch_size
        if self.hparams.batch_size % world_size:
            raise UserError(
                f"global batch_size {self.hparams.batch_size} does not split evenly over {world_size} processes; "
                "pick a multiple, or set --data.batch_size_scope device"
            )
        return self.hparams.batch_size // world_size

    def _loader(self, dataset: TensorBatches, batch_size: int, shuffle: bool) -> DataLoader:
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if self.trainer and self.trainer.overfit_batches:
            # Lightning swaps any sampler but a SequentialSampler for one here, which with the batches
            # below would feed single images; so batch the plain way, in order.
            return DataLoader(dataset, batch_size, collate_fn=default_convert)
        batches = DeviceBatches(dataset, batch_size, world_size, rank, shuffle, getattr(self, "shuffle_seed", 0))
        # batch_size=None: the sampler's items are whole batches, passed through as they come.
        return DataLoader(dataset, batch_size=None, sampler=batches, collate_fn=default_convert)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self._batch_size(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.hparams.eval_batch_size, shuffle=False)
