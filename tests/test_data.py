import gzip
import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler
from torchvision import datasets

from conftest import TEST_SIZE, TRAIN_SIZE, write_dataset, write_idx
from mnist_lightning.data import DeviceBatches, MNISTDataModule, TensorBatches
from mnist_lightning.errors import UserError
from mnist_lightning.files import idx
from mnist_lightning.files.idx import load_split


def make(data_dir, **kwargs) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(data_dir), val_size=100, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_shapes_dtypes_and_split_sizes(data_dir, dataset):
    dm = make(data_dir, dataset=dataset, batch_size=32)
    assert len(dm.train_set) == TRAIN_SIZE - 100 and len(dm.val_set) == 100 and len(dm.test_set) == TEST_SIZE
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9


def test_normalisation_uses_mean_and_std(data_dir):
    dm = make(data_dir, mean=0.5, std=0.5)
    images = dm.test_set.images
    # Raw pixels are 0..239 (noise up to 59, plus 180 on the bar), so [-1, 1] is hit at the low end only.
    assert images.min() == pytest.approx(-1.0)
    assert images.max() == pytest.approx(239 / 255 * 2 - 1)


def test_split_is_seeded_and_disjoint(data_dir):
    a, b, c = make(data_dir), make(data_dir), make(data_dir, split_seed=7)
    assert torch.equal(a.val_set.images, b.val_set.images) and torch.equal(a.train_set.labels, b.train_set.labels)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    rows = {tuple(img.flatten().tolist()) for img in a.train_set.images}
    assert not any(tuple(img.flatten().tolist()) in rows for img in a.val_set.images)


def test_batches_are_whole_and_cover_the_epoch(data_dir):
    dm = make(data_dir, batch_size=64)
    batches = list(dm.train_dataloader())
    assert sum(len(y) for _, y in batches) == len(dm.train_set)
    assert [len(y) for _, y in batches[:-1]] == [64] * (len(batches) - 1)


def test_validation_and_test_batches_take_eval_batch_size(data_dir):
    dm = make(data_dir, batch_size=32, eval_batch_size=40)
    assert len(next(iter(dm.train_dataloader()))[1]) == 32
    assert [len(y) for _, y in dm.val_dataloader()] == [40, 40, 20]
    test_sizes = [len(y) for _, y in dm.test_dataloader()]
    assert sum(test_sizes) == TEST_SIZE and set(test_sizes[:-1]) == {40}


def test_batches_come_as_index_tensors_on_the_data_device(data_dir):
    dm = make(data_dir, batch_size=64)
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, DistributedSampler)  # so that Lightning keeps it under DDP
    batch = next(iter(sampler))
    assert batch.dtype == torch.int64 and batch.shape == (64,) and batch.device == dm.train_set.labels.device


@pytest.mark.parametrize("shuffle, size", [(True, 2 * 75), (False, 149)])  # 2 ranks: padded, unpadded
def test_shards_are_disjoint_and_cover_the_set(shuffle, size):
    """What each DDP rank gets: shuffled, equal shards (one image repeated); in order, every image once."""
    data = TensorBatches(torch.zeros(149, 1, 28, 28), torch.arange(149))
    shards = [torch.cat(list(DeviceBatches(data, 50, 2, rank, shuffle, seed=5))) for rank in (0, 1)]
    assert [len(DeviceBatches(data, 50, 2, rank, shuffle, seed=5)) for rank in (0, 1)] == [2, 2]
    assert sum(len(s) for s in shards) == size
    assert set(torch.cat(shards).tolist()) == set(range(149))
    if not shuffle:
        assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_shuffle_follows_seed_and_epoch():
    data = TensorBatches(torch.zeros(100, 1, 28, 28), torch.arange(100))
    a, b = DeviceBatches(data, 100, 1, 0, True, seed=3), DeviceBatches(data, 100, 1, 0, True, seed=3)
    assert torch.equal(next(iter(a)), next(iter(b)))
    assert not torch.equal(next(iter(a)), next(iter(DeviceBatches(data, 100, 1, 0, True, seed=4))))
    b.set_epoch(1)
    assert not torch.equal(next(iter(a)), next(iter(b)))
    # Lightning makes a run's first iterator before calling set_epoch; a resumed run relies on this.
    early = iter(a)
    a.set_epoch(1)
    assert torch.equal(next(early), next(iter(b)))


def test_missing_data_without_network_names_files_and_flag(tmp_path, monkeypatch):
    # A mirror that refuses at once: the download path runs, but nothing leaves the machine.
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    dm = MNISTDataModule(data_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError) as err:
        dm.prepare_data()
    message = str(err.value)
    for name in (
        "train-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "MNIST/raw",
        "--data.data_dir",
    ):
        assert name in message
    assert "\n" not in message
    assert not list((tmp_path / "empty" / "MNIST" / "raw").iterdir())  # no half-written leftovers


def corrupt(tmp_path, name: str, content: bytes) -> MNISTDataModule:
    write_dataset(tmp_path / "MNIST" / "raw")
    (tmp_path / "MNIST" / "raw" / name).write_bytes(content)
    return MNISTDataModule(data_dir=str(tmp_path), val_size=10)


@pytest.mark.parametrize(
    "name, mutate, expected",
    [
        ("train-images-idx3-ubyte", lambda b: b[:-100], "truncated or corrupt"),
        ("train-images-idx3-ubyte", lambda b: b"", "empty or truncated"),
        ("t10k-labels-idx1-ubyte", lambda b: b"\x00\x00\x0d\x01" + b[4:], "not a uint8 IDX file"),
    ],
)
def test_corrupt_file_is_named(tmp_path, name, mutate, expected):
    write_dataset(tmp_path / "MNIST" / "raw")
    path = tmp_path / "MNIST" / "raw" / name
    path.write_bytes(mutate(path.read_bytes()))
    dm = MNISTDataModule(data_dir=str(tmp_path), val_size=10)
    with pytest.raises(UserError, match=expected) as err:
        dm.setup("fit" if name.startswith("train") else "test")
    assert name in str(err.value)


def test_label_count_mismatch_and_bad_label(tmp_path):
    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    write_dataset(raw)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(TRAIN_SIZE - 1, np.uint8))
    with pytest.raises(UserError, match=f"{TRAIN_SIZE} images but .* {TRAIN_SIZE - 1} labels"):
        MNISTDataModule(data_dir=str(tmp_path)).setup("fit")
    write_idx(raw / "train-labels-idx1-ubyte", np.full(TRAIN_SIZE, 12, np.uint8))
    with pytest.raises(UserError, match="label 12"):
        MNISTDataModule(data_dir=str(tmp_path)).setup("fit")


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 0}, {"val_size": -1}, {"std": 0.0}, {"dataset": "cifar"}, {"eval_batch_size": 0}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(UserError):
        MNISTDataModule(**kwargs)


def test_val_size_larger_than_training_set(data_dir):
    with pytest.raises(UserError, match="leaves no training data"):
        MNISTDataModule(data_dir=str(data_dir), val_size=TRAIN_SIZE).setup("fit")


def test_images_that_are_not_28x28(tmp_path):
    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    write_dataset(raw)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((TEST_SIZE, 20, 20), np.uint8))
    with pytest.raises(UserError, match=r"holds \(20, 20\) images, expected 28x28"):
        MNISTDataModule(data_dir=str(tmp_path)).setup("test")


def gzipped(raw: Path) -> dict[str, str]:
    """Replace the four files by their .gz archives, as the mirrors serve them; returns their md5s."""
    sums = {}
    for path in [p for p in raw.iterdir() if not p.name.endswith(".gz")]:
        sums[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    return sums


def test_the_gz_archives_alone_are_used_offline_and_checked(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    write_dataset(raw)
    plain = load_split(raw, "train")
    sums = gzipped(raw)
    monkeypatch.setitem(idx.RAW_MD5, "mnist", sums)  # the synthetic files play the published ones
    dm = MNISTDataModule(data_dir=str(tmp_path), val_size=10)
    dm.prepare_data()  # the archives are there: no download is tried
    assert all(torch.equal(a, b) for a, b in zip(load_split(raw, "train"), plain, strict=True))
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{name}.gz" for name in sums)  # nothing written
    monkeypatch.setitem(idx.RAW_MD5, "mnist", {})
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.gz does not hold the published MNIST file"):
        load_split(raw, "train")
    archive = raw / "t10k-images-idx3-ubyte.gz"
    archive.write_bytes(archive.read_bytes()[:-8])  # gzip's CRC and length are its last 8 bytes
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte.gz is not a whole gzip archive"):
        load_split(raw, "test")


def test_fashion_mnist_files_in_the_mnist_folder_are_named(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    write_dataset(raw)
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in raw.iterdir()}
    monkeypatch.setitem(idx.RAW_MD5, "fashion_mnist", sums)
    with pytest.warns(
        UserWarning,
        match=r"train-images-idx3-ubyte is Fashion-MNIST's file, not MNIST's; .*"
        r"Move the files to FashionMNIST/raw/ and pass --data.dataset fashion_mnist",
    ):
        load_split(raw, "train")
    monkeypatch.setitem(idx.RAW_MD5, "fashion_mnist", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_split(raw, "train")  # files of neither dataset (one's own): no warning


def test_headers_that_overflow_or_hold_no_images_are_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_dataset(raw)
    huge = bytes([0, 0, 8, 3]) + b"".join((2**32 - 1).to_bytes(4, "big") for _ in range(3))
    (raw / "t10k-images-idx3-ubyte").write_bytes(huge + bytes(100))
    with pytest.raises(
        UserError, match=r"should be 79228162458924105385300197391 bytes for shape \(4294967295, 4294967295"
    ):
        load_split(raw, "test")
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8))
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte holds no images"):
        load_split(raw, "test")


def test_a_data_dir_that_is_a_file_or_a_symlink_loop_names_the_option(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"--data.data_dir .*file is a file, not a folder"):
        MNISTDataModule(data_dir=str(tmp_path / "file"))
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UserError, match=r"--data.data_dir .*a cannot be used: .*\(a symlink loop\); pass a folder"):
        MNISTDataModule(data_dir=str(tmp_path / "a"))


def test_each_dataset_is_normalised_with_its_own_statistics_by_default():
    assert (MNISTDataModule().hparams.mean, MNISTDataModule().hparams.std) == (0.1307, 0.3081)
    fashion = MNISTDataModule(dataset="fashion_mnist")
    assert (fashion.hparams.mean, fashion.hparams.std) == (0.2860, 0.3530)
    assert MNISTDataModule(dataset="fashion_mnist", mean=0.5, std=0.5).hparams.mean == 0.5  # given ones win
