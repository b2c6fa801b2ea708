"""Random translation of a whole batch of images in a few tensor ops, on the batch's device.

Shifting digits by a pixel or two is the classic distortion that lifts an MLP on MNIST: the network
has no convolution to make it indifferent to where a stroke lies, so it must see that in the data.
"""

import torch
from torch.nn import functional as F


def translate(images: torch.Tensor, max_shift: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``images`` (N, C, H, W) moved by its own whole number of pixels, from ``-max_shift`` to
    ``max_shift`` down and across; the pixels moved in take ``fill``, the background's value.

    One pad and one gather for the whole batch: no loop over the images, no host sync.
    """
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    width = w + 2 * max_shift  # of a padded image
    padded = F.pad(images, (max_shift,) * 4, value=fill).view(n, c, -1)
    pixels = torch.arange(h * w, device=images.device)
    window = pixels // w * width + pixels % w  # each output pixel's place in the padded image, moved by -s, -s
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator, device=images.device)
    index = window + offsets[0] * width + offsets[1]  # (N, H * W); offset s, s leaves an image in place
    return padded.gather(2, index.unsqueeze(1).expand(n, c, h * w)).view(n, c, h, w)
