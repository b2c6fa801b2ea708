"""Read digits in people's own images: ``python -m mnist_lightning.predict --ckpt_path PATH IMAGE_OR_DIR...``.

Each image is prepared the way MNIST's digits were: grayscale, white ink on black, cropped to the digit,
its longest side scaled to 20 px, placed in 28x28 by its centre of mass. A 28x28 image is taken to be
MNIST-style already and is only inverted if its background is light, so MNIST digits saved as PNG reach
the model exactly as evaluate feeds them.
"""

import argparse
import csv
import io
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_lightning.errors import UserError, run_main
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.outputs import write_output
from mnist_lightning.net import normalise

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # what a folder is searched for
# The only Pillow decoders an image from a user or the network reaches. Plain Image.open tries every
# plugin Pillow has: its EPS plugin runs Ghostscript from PATH on the file's PostScript, and others parse
# formats no digit comes in. Anything else is refused before a byte of it is decoded.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
FORMAT_NAMES = "PNG, JPEG, BMP, GIF, WebP or TIFF"
MAX_PIXELS = 50_000_000  # a 50-megapixel photo; anything bigger is refused as a likely decompression bomb
INK = 64  # of 255: fainter pixels (paper texture, JPEG noise) do not widen the digit's box


def grayscale(image: Image.Image) -> np.ndarray:
    """Gray levels 0-255 as floats; transparency flattened onto a background the ink stands out from."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16-bit, 32-bit and float: Pillow's convert("L") would clip at 255. Their scale is anyone's (12 bits in
        # 16, floats in 0-1 or in counts), so the image's own range becomes 0-255.
        gray = np.asarray(image, dtype=np.float64)
        low, high = gray.min(), gray.max()
        return ((gray - low) * (255 / (high - low)) if high > low else gray * 0).astype(np.float32)
    if "A" in image.mode or "transparency" in image.info:
        gray, alpha = np.moveaxis(np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32), -1, 0)
        alpha /= 255
        # Drawn on a transparent canvas, dark ink goes onto white and light ink onto black.
        ink_level = (gray * alpha).sum() / max(alpha.sum(), 1e-9)
        return gray * alpha + (255 if ink_level < 128 else 0) * (1 - alpha)
    return np.asarray(image.convert("L"), dtype=np.float32)


def preprocess(image: Image.Image) -> np.ndarray:
    """One image of any size and mode -> the 28x28 uint8 white-on-black digit the model sees."""
    gray = grayscale(ImageOps.exif_transpose(image))  # phone photos store their rotation in EXIF
    if (factor := max(gray.shape) // 1000) > 1:  # a photo's millions of pixels only slow down a 20 px digit
        gray = np.asarray(Image.fromarray(gray, "F").reduce(factor))
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = np.median(border)
    if background > 127:
        gray, background = 255 - gray, 255 - background
    if gray.max() - background < INK:
        raise UserError("no digit found: the image is blank")
    if gray.shape == (28, 28):
        return gray.round().astype(np.uint8)
    ink = np.clip((gray - background) * 255 / (gray.max() - background), 0, 255)
    rows, cols = np.nonzero(ink >= INK)
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = 20 / max(ink.shape)
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
    # Bilinear: smooth, anti-aliased strokes like MNIST's, without the ringing of Lanczos.
    digit = np.asarray(Image.fromarray(ink.round().astype(np.uint8)).resize(size, Image.Resampling.BILINEAR))
    weights = digit.astype(np.float64)
    centre = [(weights.sum(axis=1 - a) * np.arange(digit.shape[a])).sum() / weights.sum() for a in (0, 1)]
    # Centre of mass onto the middle of the 28x28 field (13.5), but never pushing the digit off the edge.
    top, left = (int(np.clip(np.floor(14 - c), 0, 28 - n)) for c, n in zip(centre, digit.shape, strict=True))
    out = np.zeros((28, 28), np.uint8)
    out[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return out


class UnsupportedImage(UserError):
    """A file that is none of the decoded FORMATS (the server answers it with 415)."""


def read_image(source: Path | bytes) -> np.ndarray:
    """Open and preprocess one file, or its bytes (an upload); a UserError says in a few words why it can't be.

    Only the decoders of ``FORMATS`` are used, whatever the file claims to be.
    """
    try:
        if (len(source) if isinstance(source, bytes) else source.stat().st_size) == 0:
            raise UserError("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise Image.DecompressionBombError
                image.load()
                return preprocess(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"over {MAX_PIXELS:,} pixels, refused as a possible decompression bomb") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(f"not an image that can be read: only {FORMAT_NAMES} files are read") from None
    except OSError as err:  # missing, unreadable, truncated
        raise UserError(f"cannot be read: {err.strerror or err}") from None
    except UserError:
        raise
    except Exception as err:  # a corrupt file can make a decoder fail in any way; it must not stop the rest
        raise UserError(f"corrupt image ({type(err).__name__}: {err})") from None


def find_images(inputs: list[str]) -> list[Path]:
    """Named files as given, folders searched recursively for image files, symlinked folders followed
    (each real folder once); what a folder holds besides images is counted on stderr, not silently dropped."""
    paths = []
    for name in map(Path, inputs):
        if not name.is_dir():
            paths.append(name)  # tried whatever its suffix; if missing, it fails with the other bad files
            continue
        found, skipped, seen = [], Counter(), set()
        for folder, subfolders, files in os.walk(name, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a symlink back up the tree, or two links to one folder
                subfolders.clear()
                continue
            seen.add(real)
            subfolders.sort()
            for file in map(Path(folder).joinpath, files):
                if file.suffix.lower() in SUFFIXES and file.is_file():
                    found.append(file)
                elif not file.name.startswith("."):
                    skipped[file.suffix.lower() or "no suffix"] += 1
        if skipped:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
            print(f"note: {name}: skipped what is not an image: {kinds}", file=sys.stderr)
        if not found:
            raise UserError(f"{name} holds no {', '.join(sorted(SUFFIXES))} files; name the images to read")
        paths += sorted(found)
    return paths


def cli_main(args: list[str] | None = None) -> list[dict]:
    """Predict every image, print one line each and return the predictions; failures end in a UserError."""
    parser = argparse.ArgumentParser(prog="python -m mnist_lightning.predict", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders (recursive)")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by mnist_lightning.fit")
    parser.add_argument("--output", type=Path, help="also write the predictions to this .json or .csv file")
    parser.add_argument("--save-preprocessed", type=Path, metavar="DIR", help="write the 28x28 images seen here")
    parser.add_argument("--batch_size", type=int, default=1024, help="images per model call")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    config = parser.parse_args(args)
    if config.output and config.output.suffix not in (".json", ".csv"):
        raise UserError(f"--output {config.output} must end in .json or .csv")
    if config.batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {config.batch_size}")
    model, (mean, std), _ = load_checkpoint(config.ckpt_path)
    if config.save_preprocessed:
        try:
            config.save_preprocessed.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {config.save_preprocessed} ({err.strerror}); pick another folder") from None
    paths, predictions, failures = find_images(config.inputs), [], 0
    for start in range(0, len(paths), config.batch_size):
        batch, images = [], []
        for path in paths[start : start + config.batch_size]:
            try:
                images.append(read_image(path))
                batch.append(path)
            except UserError as err:
                print(f"error: {path}: {err}", file=sys.stderr, flush=True)
                failures += 1
        if not batch:
            continue
        images = np.stack(images)
        with torch.inference_mode():
            top = model(normalise(torch.from_numpy(images).unsqueeze(1), mean, std)).softmax(1).topk(3)
        for path, image, probs, digits in zip(batch, images, top.values.tolist(), top.indices.tolist(), strict=True):
            top3 = list(zip(digits, probs, strict=True))
            row = {"path": str(path), "digit": digits[0], "probability": probs[0], "top3": top3}
            print(f"{path}  {digits[0]}  {probs[0]:.3f}  top3 " + " ".join(f"{d}:{p:.3f}" for d, p in top3))
            if config.save_preprocessed:
                Image.fromarray(image).save(config.save_preprocessed / f"{len(predictions):05d}_{path.stem}.png")
            predictions.append(row)
    if config.output:
        write(config.output, predictions)
    if failures:
        raise UserError(f"{failures} of {len(paths)} files could not be read (listed above); the rest were predicted")
    return predictions


def write(path: Path, predictions: list[dict]) -> None:
    if path.suffix == ".json":
        write_output(path, json.dumps(predictions, indent=2))
        return
    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(["path", "digit", "probability", "digit2", "probability2", "digit3", "probability3"])
    for row in predictions:
        out.writerow([row["path"], *(x for pair in row["top3"] for x in pair)])
    # A file name that is not UTF-8 (Python holds its bytes as surrogates) is written as its own bytes,
    # as ls prints it, rather than crash the writer.
    write_output(path, text.getvalue().encode("utf-8", "surrogateescape"))


def main() -> None:
    run_main(cli_main)


if __name__ == "__main__":
    main()
