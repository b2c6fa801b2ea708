"""What an image costs to decode is bounded by its header: no more memory than a few bytes a pixel, photos
decoded small, one frame only."""

import io
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mnist_lightning.errors import UserError
from mnist_lightning.files.images import MAX_PIXELS, open_image, read_image
from test_predict import drawn_seven, png_claiming


def encoded(image: Image.Image, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def photo(size=(4032, 3024)) -> Image.Image:
    """A seven drawn on a phone photo's page of paper, in colour."""
    return drawn_seven().resize((size[1] // 2, size[1] * 3 // 4)).convert("RGB").crop((0, 0, *size))


def test_a_small_file_declaring_a_huge_image_is_refused_from_its_header(tmp_path):
    png_claiming(tmp_path / "bomb.png", 20_000, 20_000)
    data = (tmp_path / "bomb.png").read_bytes()
    assert len(data) < 100
    started = time.perf_counter()
    with pytest.raises(UserError, match=f"over {MAX_PIXELS:,} pixels"):
        read_image(data)
    assert time.perf_counter() - started < 0.1  # nothing decoded, nothing allocated


def test_a_big_image_takes_a_few_bytes_a_pixel_at_its_peak(tmp_path):
    """A 16-megapixel RGBA PNG of 80 kB took 395 MB at its peak (25 bytes a pixel), in wide copies."""
    image = Image.new("RGBA", (4000, 4000), (0, 0, 0, 0))
    ImageDraw.Draw(image).line([(1200, 800), (2800, 3200)], fill=(20, 20, 200, 255), width=300)
    (tmp_path / "big.png").write_bytes(encoded(image))
    code = (
        "import resource, sys; from pathlib import Path; from mnist_lightning.files.images import read_image; "
        "data = Path(sys.argv[1]).read_bytes(); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "read_image(data); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    peak_kb = int(subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.png")], capture_output=True,
                                 text=True, check=True).stdout)  # fmt: skip
    assert peak_kb * 1024 < 8 * 4000 * 4000  # the decoded RGBA is 4 bytes a pixel


def test_a_photo_is_decoded_small_and_upright():
    """libjpeg decodes a 12-megapixel JPEG at a quarter of its size, in grayscale: 1008x756, not 4032x3024."""
    upright = encoded(photo(), "JPEG", quality=90)
    with open_image(upright) as image:
        assert image.size == (1008, 756) and image.mode == "L"
    expected = read_image(encoded(photo().resize((1008, 756)), "PNG"))
    assert np.abs(read_image(upright).astype(int) - expected).max() <= 16
    # Phones store the photo as the sensor saw it and say how to turn it in EXIF: 6, turn it 90° clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = encoded(photo().transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif)
    assert np.abs(read_image(sideways).astype(int) - expected).max() <= 16


@pytest.mark.parametrize("kind", ["GIF", "WEBP", "TIFF"])
def test_only_the_first_frame_of_an_animation_or_a_multi_page_file_is_read(kind):
    first = drawn_seven().convert("RGB")
    # Blank, in 50 shades of near-white (identical frames would be merged): read, they would be no digit.
    others = [Image.new("RGB", first.size, (255 - i,) * 3) for i in range(50)]
    data = encoded(first, kind, save_all=True, append_images=others)
    with Image.open(io.BytesIO(data)) as image:
        assert image.n_frames > 10  # lossy WebP merges some of them
    assert np.abs(read_image(data).astype(int) - read_image(encoded(first, kind))).max() <= 16
