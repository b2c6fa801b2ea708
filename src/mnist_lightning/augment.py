"""Random translation of a whole batch of images in a few tensor ops, on the batch's device.

Shifting digits by a pixel or two is the classic distortion that lifts an MLP on MNIST: the network
has no convolution to make it indifferent to where a stroke lies, so it must see that in the data.
"""

import torch
from torch.nn import functional as F


def translate(images: torch.Tensor, max_shift: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``images`` (N, C, H, W) moved by its own whole number of pixels, from ``-max_shift`` to
    ``max_shift`` down and across; the pixels moved in take ``fill``, the background's value.

    One pad and one gather for the whole batch, indexed by two numbers an image: no loop over the
    images, no host sync.
    """
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=fill)  # (N, C, H + 2s, W + 2s)
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (N, C, 2s + 1, 2s + 1, H, W): every crop, a view
    top, left = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator, device=images.device)
    return windows[torch.arange(n, device=images.device), :, top, left]  # crop s, s leaves an image in place
