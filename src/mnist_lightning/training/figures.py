"""The pictures of the test results fit puts in TensorBoard's Images tab, drawn with matplotlib.

matplotlib is imported inside each function: only a test needs it, never ``--help``.
"""

import warnings
from typing import TYPE_CHECKING

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_lightning.calibration import BINS, calibration_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def confusion_figure(matrix: torch.Tensor) -> "Figure":
    """torchmetrics' plot of the confusion matrix (rows: true digit, columns: predicted), with every count
    legible and a colour scale on which a single mistake shows."""
    from matplotlib.colors import PowerNorm  # here: only the test needs matplotlib, not --help
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 7.5), layout="constrained")
    axes = figure.subplots()
    with warnings.catch_warnings():  # matplotlib asks the tensor for an array the way numpy 2 deprecates
        warnings.filterwarnings(
            "ignore", ".*__array__ implementation doesn't accept a copy keyword", DeprecationWarning
        )
        MulticlassConfusionMatrix(10).plot(val=matrix.cpu(), ax=axes, cmap="Blues")
    image = axes.images[0]
    # A linear scale leaves 1-20 mistakes beside ~1000 correct the colour of 0; a power scale lifts them.
    image.set_norm(PowerNorm(gamma=0.2, vmin=0, vmax=max(int(matrix.max()), 1)))
    for text in axes.texts:  # torchmetrics picked each count's colour on the linear scale: pick again
        column, row = (round(v) for v in text.get_position())
        red, green, blue, _ = image.cmap(image.norm(float(matrix[row, column])))
        text.set_color("white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "black")
        text.set_fontsize(11)
    axes.tick_params(labelrotation=0)
    figure.colorbar(image, ax=axes, label="images (power scale)")
    axes.set_title("Test set: true digit against predicted digit")
    return figure


def mistakes_figure(images: torch.Tensor, true: torch.Tensor, predicted: torch.Tensor, columns: int = 8) -> "Figure":
    """Misread digits in a grid, each captioned with its true digit and what the model read.

    One image of all the digits, on one set of axes: a subplot per digit took 3 s to draw.
    """
    from matplotlib.figure import Figure

    rows, cell, caption = max(1, -(-len(images) // columns)), 30, 8  # pixels: a digit and its margin, a caption
    grid = torch.ones(rows * (cell + caption), columns * cell)
    for i, image in enumerate(images.cpu().reshape(-1, 28, 28)):
        image = (image - image.min()) / (image.max() - image.min() + 1e-8)  # whatever the normalisation
        top, left = (i // columns) * (cell + caption) + caption, (i % columns) * cell
        grid[top + 1 : top + 29, left + 1 : left + 29] = 1 - image  # dark ink on white
    figure = Figure(figsize=(1.1 * columns, 1.3 * rows))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    axes.set_axis_off()
    for i, (t, p) in enumerate(zip(true.tolist(), predicted.tolist(), strict=True)):
        x, y = (i % columns) * cell + cell / 2, (i // columns) * (cell + caption) + caption / 2 + 1
        axes.text(x, y, f"{t} read as {p}", ha="center", va="center", fontsize=9, color="firebrick")
    return figure


def reliability_figure(before: torch.Tensor, after: torch.Tensor, temperature: float) -> "Figure":
    """Accuracy against top-1 confidence per bin, from ``reliability``'s sums, before and after the temperature;
    a calibrated model's bars sit on the diagonal."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 5.5), layout="constrained")
    axes = figure.subplots()
    width = 1 / BINS
    centres = (torch.arange(BINS) + 0.5) * width
    for bins, label, colour in (
        (before, "softmax(logits)", "lightgrey"),
        (after, f"softmax(logits / {temperature:.3g})", "tab:blue"),
    ):
        images, _, correct = bins.cpu()
        accuracy = correct / images.clamp(min=1)
        shown = images > 0  # an empty bin has no accuracy
        ece = calibration_error(bins)
        axes.bar(centres[shown], accuracy[shown], width * 0.9, color=colour, alpha=0.7, label=f"{label}: ECE {ece:.2%}")
    axes.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 probability (15 bins)", ylabel="accuracy in the bin")
    axes.legend(loc="upper left")
    axes.set_title("Test set: reliability diagram")
    return figure
