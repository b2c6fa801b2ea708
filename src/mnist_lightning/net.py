"""The network and its input, in plain PyTorch: what the commands that use a checkpoint need, no Lightning."""

import torch
from torch import nn

from mnist_lightning.errors import UserError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the 60k training pixels scaled to [0, 1]


class MLP(nn.Sequential):
    """The classic 784-128-64-10 multilayer perceptron with ReLU."""

    def __init__(self, hidden1: int = 128, hidden2: int = 64):
        try:
            super().__init__(
                nn.Flatten(),
                nn.Linear(28 * 28, hidden1),
                nn.ReLU(),
                nn.Linear(hidden1, hidden2),
                nn.ReLU(),
                nn.Linear(hidden2, 10),
            )
        except RuntimeError as err:  # torch's allocators raise RuntimeError (or its OutOfMemoryError)
            if "allocate" not in str(err):
                raise
            size = 4 * ((28 * 28 + 1) * hidden1 + (hidden1 + 1) * hidden2 + (hidden2 + 1) * 10)
            raise UserError(
                f"a 784-{hidden1}-{hidden2}-10 network needs {size / 2**30:.1f} GiB for its float32 weights alone, "
                "more than can be allocated; pick smaller --model.hidden1 and --model.hidden2"
            ) from None


def normalise(pixels: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """0-255 pixels (uint8 or float, any shape) -> the float32 input the network was trained on.

    Training, evaluate, predict, serve and the exported graphs all call this, so they agree to the bit.
    """
    # A copy, then in place: no temporaries for the 55k training images, and never the caller's tensor.
    return pixels.to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)
