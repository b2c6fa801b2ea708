"""Step 2 of the tutorial, the network, and its input, in plain PyTorch: all that the commands that use a
checkpoint need, no Lightning."""

import torch
from torch import nn


class MLP(nn.Sequential):
    """The classic 784-128-64-10 multilayer perceptron with ReLU."""

    def __init__(self, hidden1: int = 128, hidden2: int = 64):
        super().__init__(
            nn.Flatten(),  # a 28x28 image -> 784 pixels
            nn.Linear(28 * 28, hidden1),
            nn.ReLU(),
            nn.Linear(hidden1, hidden2),
            nn.ReLU(),
            nn.Linear(hidden2, 10),  # one logit per digit
        )


def normalise(pixels: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """0-255 pixels (uint8 or float, any shape) -> the float32 input the network was trained on.

    Training, evaluate, predict, serve and the exported graphs all call this, so they agree to the bit.
    """
    # A copy, then in place: no temporaries for the 55k training images, and never the caller's tensor.
    return pixels.to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)
