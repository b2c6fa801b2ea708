"""MNIST's four IDX files: where they live and how they are read and checked, in plain PyTorch."""

import errno
import gzip
import hashlib
import math
import warnings
import zlib
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


# The md5 of each decompressed file, the same whichever mirror or archive it came from.
RAW_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
# Each dataset's pixel mean and standard deviation over its 60k training images, scaled to [0, 1].
STATS = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}


def raw_dir(data_dir: str | Path, dataset: str) -> Path:
    """``DATA_DIR/MNIST/raw``; a data_dir that is a file, or a symlink loop, is refused naming the option."""
    try:
        Path(data_dir).stat()
    except FileNotFoundError:
        pass  # made by the download
    except OSError as err:
        loop = " (a symlink loop)" if err.errno == errno.ELOOP else ""
        raise UserError(f"--data.data_dir {data_dir} cannot be used: {err.strerror}{loop}; pass a folder") from None
    else:
        if not Path(data_dir).is_dir():
            raise UserError(f"--data.data_dir {data_dir} is a file, not a folder: pass the folder holding MNIST/raw/")
    return Path(data_dir) / FOLDERS[dataset] / "raw"


def present(path: Path) -> bool:
    """The file, or its .gz archive as the mirrors serve it."""
    return path.is_file() or path.with_name(path.name + ".gz").is_file()


def dataset_of(path: Path) -> str | None:
    """The dataset a file under ``DATA_DIR/FOLDER/raw/`` is read as."""
    return next((d for d, folder in FOLDERS.items() if folder == path.parent.parent.name), None)


def _read(path: Path, check: bool) -> tuple[bytes, str | None]:
    """The file's bytes and, if ``check``, which dataset's published file they are; without the file, its
    .gz archive's, decompressed in memory and always checked against the published md5 (people fetch
    the archives by hand when the download mirrors fail)."""
    archive = path.with_name(path.name + ".gz")
    if path.is_file() or not archive.is_file():
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path} is missing; download MNIST again or fix --data.data_dir") from None
        return raw, identify(path.name, raw) if check else None
    try:
        raw = gzip.decompress(archive.read_bytes())
    except (OSError, EOFError, zlib.error) as err:  # gzip's own CRC and length checks
        raise UserError(f"{archive} is not a whole gzip archive ({err}); delete it to download again") from None
    found = identify(path.name, raw)
    if found is None:
        raise UserError(
            f"{archive} does not hold the published {NAMES[dataset_of(path)]} file (its md5 differs); delete it "
            f"to download again, or decompress your own file to {path}"
        )
    return raw, found


def identify(name: str, raw: bytes) -> str | None:
    """Which dataset's published file these bytes are (md5, ~0.1 s for the 47 MB training images)."""
    digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    return next((dataset for dataset, sums in RAW_MD5.items() if sums.get(name) == digest), None)


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Read one uint8 IDX file, refusing anything whose header does not match its contents."""
    wanted = dataset_of(path)
    raw, found = _read(path, check=wanted is not None and ndim == 3)  # the images name the dataset
    if ndim == 3 and found and found != wanted:
        warnings.warn(
            f"{path} is {NAMES[found]}'s file, not {NAMES[wanted]}'s; reading it as {NAMES[wanted]}. "
            f"Move the files to {FOLDERS[found]}/raw/ and pass --data.dataset {found}",
            stacklevel=2,
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is empty or truncated ({len(raw)} bytes); delete it to download again")
    if raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise UserError(
            f"{path} is not a uint8 IDX file with {ndim} dimension(s) (magic {raw[:4].hex()}); "
            "delete it to download again"
        )
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(shape)  # Python integers: four 32-bit dimensions overflow int64
    if len(raw) != expected:
        raise UserError(
            f"{path} should be {expected} bytes for shape {tuple(shape)} but is {len(raw)}; "
            "it is truncated or corrupt, delete it to download again"
        )
    if expected == header:  # frombuffer refuses an empty buffer
        return torch.zeros(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(shape)


def load_split(raw: Path, split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one split into uint8 images (N, 1, 28, 28) and int64 labels (N,), checked for consistency."""
    images_file, labels_file = (raw / name for name in FILES[split])
    images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
    if len(images) == 0:
        raise UserError(f"{images_file} holds no images; delete it to download again, or fix --data.data_dir")
    if images.shape[1:] != (28, 28):
        raise UserError(f"{images_file} holds {tuple(images.shape[1:])} images, expected 28x28")
    if len(images) != len(labels):
        raise UserError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise UserError(f"{labels_file} holds label {int(labels.max())}; labels must be 0-9")
    return images.unsqueeze(1), labels.long()
