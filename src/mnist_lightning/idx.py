"""MNIST's four IDX files: where they live and how they are read and checked, in plain PyTorch."""

from pathlib import Path
from typing import Literal

import torch

from mnist_lightning.errors import UserError

# torchvision's layout: <data_dir>/<its class name>/raw/; both datasets share MNIST's file names.
FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def raw_dir(data_dir: str | Path, dataset: str) -> Path:
    return Path(data_dir) / FOLDERS[dataset] / "raw"


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Read one uint8 IDX file, refusing anything whose header does not match its contents."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; download MNIST again or fix --data.data_dir") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is empty or truncated ({len(raw)} bytes); delete it to download again")
    if raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise UserError(
            f"{path} is not a uint8 IDX file with {ndim} dimension(s) (magic {raw[:4].hex()}); "
            "delete it to download again"
        )
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + torch.Size(shape).numel()
    if len(raw) != expected:
        raise UserError(
            f"{path} should be {expected} bytes for shape {tuple(shape)} but is {len(raw)}; "
            "it is truncated or corrupt, delete it to download again"
        )
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(shape)


def load_split(raw: Path, split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one split into uint8 images (N, 1, 28, 28) and int64 labels (N,), checked for consistency."""
    images_file, labels_file = (raw / name for name in FILES[split])
    images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
    if images.shape[1:] != (28, 28):
        raise UserError(f"{images_file} holds {tuple(images.shape[1:])} images, expected 28x28")
    if len(images) != len(labels):
        raise UserError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise UserError(f"{labels_file} holds label {int(labels.max())}; labels must be 0-9")
    return images.unsqueeze(1), labels.long()
