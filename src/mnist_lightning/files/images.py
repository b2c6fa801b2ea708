"""People's own images -> the 28x28 white-on-black digits the network was trained on, as MNIST's were made.

Each image is prepared the way MNIST's digits were: grayscale, white ink on black, cropped to the digit,
its longest side scaled to 20 px, placed in 28x28 by its centre of mass. A 28x28 image is taken to be
MNIST-style already and is only inverted if its background is light, so MNIST digits saved as PNG reach
the model exactly as evaluate feeds them. predict and the server both read images here.
"""

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_lightning.errors import UserError

# The only Pillow decoders an image from a user or the network reaches. Plain Image.open tries every
# plugin Pillow has: its EPS plugin runs Ghostscript from PATH on the file's PostScript, and others parse
# formats no digit comes in. Anything else is refused before a byte of it is decoded.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
FORMAT_NAMES = "PNG, JPEG, BMP, GIF, WebP or TIFF"
MAX_PIXELS = 50_000_000  # a 50-megapixel photo; anything bigger is refused as a likely decompression bomb
# A photo's millions of pixels only slow down finding a 20 px digit: it is reduced to about this many on its
# longest side before anything else, so that no copy of it is wider than the decoded image itself.
DETAIL = 1000
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


def smaller(image: Image.Image) -> Image.Image:
    """The image averaged down by a whole factor to about DETAIL px on its longest side (as it is if smaller)."""
    if (factor := max(image.size) // DETAIL) <= 1:
        return image
    # Pillow averages neither palette indices nor 16-bit or 1-bit pixels: those become the mode grayscale reads.
    if "transparency" in image.info or image.mode == "PA":
        image = image.convert("RGBA")
    elif image.mode in ("1", "P"):
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    return image.reduce(factor)


def preprocess(image: Image.Image) -> np.ndarray:
    """One upright image of any size and mode -> the 28x28 uint8 white-on-black digit the model sees."""
    gray = grayscale(smaller(image))
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


@contextmanager
def image_errors() -> Iterator[None]:
    """Whatever goes wrong in opening or decoding a file, as a UserError that says in a few words why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
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


def open_image(source: Path | bytes) -> Image.Image:
    """One file, or its bytes (an upload), opened from its header alone: nothing is decoded yet.

    Only the decoders of ``FORMATS`` are used, whatever the file claims to be, and only its first frame.
    An image over MAX_PIXELS is refused here, before a pixel is allocated; a big JPEG is set to decode in
    grayscale at 1/2 to 1/8 of its size (libjpeg's DCT scaling), so ``size`` is then what will be decoded.
    """
    with image_errors():
        if (len(source) if isinstance(source, bytes) else source.stat().st_size) == 0:
            raise UserError("empty file")
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS)
        try:
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError
            if image.format == "JPEG" and (factor := max(image.size) // DETAIL) > 1:
                image.draft("L", (image.width // factor, image.height // factor))
        except BaseException:
            image.close()
            raise
        return image


def decode(image: Image.Image) -> np.ndarray:
    """An opened image's first frame, decoded, turned upright and preprocessed."""
    with image_errors():
        ImageOps.exif_transpose(image, in_place=True)  # phone photos store their rotation in EXIF
        return preprocess(image)


def read_image(source: Path | bytes) -> np.ndarray:
    """Open, decode and preprocess one file, or its bytes; a UserError says in a few words why it can't be."""
    with open_image(source) as image:
        return decode(image)
