"""What an image costs to decode is bounded by its header: no more memory than a few bytes a pixel, photos
decoded small, one frame only, and never more than a few big decodes at once on the server."""

import asyncio
import io
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mnist_lightning.errors import UserError
from mnist_lightning.files.images import MAX_PIXELS, decode, open_image, read_image
from mnist_lightning.serve import decoding
from mnist_lightning.serve.decoding import INLINE_BYTES, INLINE_PIXELS, Decoder
from mnist_lightning.serve.uploads import BadRequest
from serving import run_coroutine
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


def big_padded_and_small() -> tuple[bytes, bytes, bytes]:
    """An image over INLINE_PIXELS, one of few pixels but over INLINE_BYTES (of empty text chunks, each a
    Python call to open), both read in a thread, and one under both, read on the event loop."""
    big, small = encoded(drawn_seven().resize((400, 600))), encoded(drawn_seven().resize((100, 150)))
    chunks = (struct.pack(">I", 3) + b"tEXtk\0v" + struct.pack(">I", zlib.crc32(b"tEXtk\0v"))) * 2000
    padded = small[:33] + chunks + small[33:]  # after the signature and the IHDR chunk
    with open_image(big) as image:
        assert image.width * image.height > INLINE_PIXELS
    with open_image(small) as image:
        assert image.width * image.height <= INLINE_PIXELS and len(small) <= INLINE_BYTES < len(padded)
    return big, padded, small


def test_only_small_images_are_read_on_the_event_loop_and_at_most_two_in_threads(monkeypatch):
    running, most, threads, inline = 0, 0, [], []
    lock = threading.Lock()

    def counted(data: bytes):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threads.append(threading.get_ident())
        time.sleep(0.1)
        with lock:
            running -= 1
        return read_image(data)

    monkeypatch.setattr(decoding, "read_image", counted)
    monkeypatch.setattr(decoding, "decode", lambda image: inline.append(threading.get_ident()) or decode(image))
    big, padded, small = big_padded_and_small()

    async def main() -> tuple[list, int]:
        decoder = Decoder()
        digits = await asyncio.gather(*[decoder.digit(data) for data in [big, padded] * 3 + [small]])
        return digits, threading.get_ident()

    digits, loop_thread = run_coroutine(main())
    assert len(digits) == 7 and np.array_equal(digits[0], read_image(big))
    assert inline == [loop_thread]  # the small one, on the event loop's own thread
    assert len(threads) == 6 and loop_thread not in threads and most == 2


def test_a_read_that_cannot_get_a_slot_in_time_is_answered_503(monkeypatch):
    monkeypatch.setattr(decoding, "read_image", lambda data: time.sleep(0.5) or read_image(data))
    big, padded, small = big_padded_and_small()

    async def main() -> list:
        decoder = Decoder(slots=1, wait=0.1)
        reads = decoder.digit(big), decoder.digit(padded), decoder.digit(small)
        return await asyncio.gather(*reads, return_exceptions=True)

    first, second, inline = run_coroutine(main())
    assert isinstance(first, np.ndarray) and isinstance(inline, np.ndarray)  # a small one needs no slot
    assert isinstance(second, BadRequest) and second.status == 503
    assert second.headers == {"Retry-After": "5"} and "busy" in second.body["error"]
