"""Uploads to digits without stalling the server: small images on the event loop, big ones in a few threads.

An image's bytes say little of its cost: a 50 kB PNG can declare 49 megapixels, a second of decoding,
and a 9 MB one can hold 600,000 empty chunks that take Pillow 5 s to open. So only a file that is small in
bytes and, by its header, in pixels is read on the event loop; any other is opened and decoded in a thread,
and a cap on those at once bounds the memory they take together.
"""

import asyncio

import numpy as np
from starlette.concurrency import run_in_threadpool

from mnist_lightning.files.images import decode, open_image, read_image
from mnist_lightning.serve.uploads import BadRequest

# Read on the event loop up to both: the page's 280x280 canvas (78,400 pixels, a few kB) takes about 1.2 ms,
# less than the hop to a thread; a 1000x1000 PNG takes 15 ms, every client's wait. Opening costs Pillow
# about 9 us a PNG chunk, so 16 kB of 12-byte chunks is at most about 12 ms.
INLINE_BYTES = 16_000
INLINE_PIXELS = 100_000
# Big decodes at once, per worker process. One takes up to about 8 bytes a pixel at its peak (400 MB for
# a 50-megapixel RGBA PNG, 10 MB for a 12-megapixel JPEG photo), and two keep two cores busy.
DECODE_SLOTS = 2
SLOT_WAIT_SECONDS = 10  # a request that waits longer for a slot is answered 503: the server is overloaded
RETRY_AFTER_SECONDS = 5


class Decoder:
    """``await decoder.digit(data)``: the 28x28 digit in an upload, with at most ``slots`` big decodes at once.

    Raises what ``read_image`` raises (UserError, UnsupportedImage), and BadRequest 503 when no slot frees up
    within ``wait`` seconds.
    """

    def __init__(self, slots: int = DECODE_SLOTS, wait: float = SLOT_WAIT_SECONDS):
        self.slots, self.wait = asyncio.Semaphore(slots), wait

    async def digit(self, data: bytes) -> np.ndarray:
        if len(data) <= INLINE_BYTES:
            with open_image(data) as image:
                if image.width * image.height <= INLINE_PIXELS:
                    return decode(image)
        try:  # asyncio.timeout, not wait_for: in 3.11 wait_for can lose a slot acquired as it times out
            async with asyncio.timeout(self.wait):
                await self.slots.acquire()
        except TimeoutError:
            raise BadRequest(
                503,
                f"the server is busy decoding other images; retry in {RETRY_AFTER_SECONDS} s",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        try:  # not abandoned if this request is cancelled: the slot is held until the thread is done
            return await run_in_threadpool(read_image, data)
        finally:
            self.slots.release()
