from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback

from conftest import FAST
from mnist_lightning.augment import translate
from mnist_lightning.data import MNISTDataModule
from mnist_lightning.errors import UserError
from mnist_lightning.files.idx import STATS
from mnist_lightning.net import normalise


def shifted(image: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """One image moved dy down and dx across the slow way, for reference."""
    out = torch.full_like(image, fill)
    h, w = image.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_translate_moves_each_image_by_at_most_the_shift_and_fills_the_background():
    images = torch.rand(64, 1, 28, 28)
    out = translate(images, 2, -0.5, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    moves = []
    for image, moved in zip(images, out, strict=True):
        matches = [
            (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(moved, shifted(image, dy, dx, -0.5))
        ]
        assert len(matches) == 1
        moves.append(matches[0])
    assert len(set(moves)) > 10  # each image draws its own shift, and all 25 are possible


def test_translate_is_deterministic_under_a_seed_and_off_at_zero():
    images = torch.rand(32, 1, 28, 28)
    a, b, c = (translate(images, 1, 0.0, torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert translate(images, 0, 0.0, torch.Generator()) is images


def datamodule(data_dir, shift: int) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(data_dir), val_size=100, shift=shift)
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_the_hook_shifts_training_batches_only_with_the_background_of_the_normalised_images(data_dir):
    dm = datamodule(data_dir, shift=3)
    batch = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=False, global_rank=0, global_step=0, overfit_batches=0)
    assert dm.on_after_batch_transfer(batch, 0) is batch  # validating, testing, predicting
    dm.trainer.training = True
    images, labels = dm.on_after_batch_transfer(batch, 0)
    assert labels is batch[1] and images.shape == batch[0].shape and not torch.equal(images, batch[0])
    background = normalise(torch.zeros(()), *STATS["mnist"])  # a 0 pixel, normalised
    moved_in = images == background
    assert moved_in.sum() > (batch[0] == background).sum() and images.min() == background
    again = dm.on_after_batch_transfer(batch, 0)[0]
    dm.trainer.global_step = 1
    other_step = dm.on_after_batch_transfer(batch, 0)[0]
    assert torch.equal(images, again) and not torch.equal(images, other_step)


def test_shift_is_checked(data_dir):
    with pytest.raises(UserError, match="shift must be 0"):
        MNISTDataModule(data_dir=str(data_dir), shift=-1)


class Batches(Callback):
    """Records the batches each stage's steps receive, after the transfer hooks."""

    def __init__(self):
        self.seen = {"train": [], "val": [], "test": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen["train"].append(batch[0].clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen["val"].append(batch[0].clone())

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen["test"].append(batch[0].clone())


def unchanged(batches: list[torch.Tensor], images: torch.Tensor) -> float:
    """The share of the images in the batches that are exactly one of ``images``."""
    seen = torch.cat(batches).flatten(1)
    # Exact distances: the matmul form of cdist would leave rounding where two images are equal.
    distance = torch.cdist(seen, images.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    return (distance.min(1).values == 0).float().mean().item()


def test_a_fit_trains_on_shifted_images_and_validates_and_tests_on_the_originals(data_dir, tmp_path):
    from mnist_lightning.fit import cli_main

    recorder = Batches()
    args = ["--data.data_dir", str(data_dir), *FAST, "--trainer.max_epochs", "1", "--data.shift", "2"]
    args += ["--trainer.enable_model_summary", "true"]  # its example input passes through the hook too
    cli_main([*args, "--trainer.default_root_dir", str(tmp_path)], callbacks=(recorder,))
    dm = datamodule(data_dir, shift=0)
    assert unchanged(recorder.seen["train"], dm.train_set.images) < 0.5  # 1 in 25 draws no move
    assert unchanged(recorder.seen["val"], dm.val_set.images) == 1.0
    assert unchanged(recorder.seen["test"], dm.test_set.images) == 1.0
