from pathlib import Path

import torch

from mnist_lightning import model as model_module
from mnist_lightning.metrics import LossAndAccuracy
from mnist_lightning.model import MNISTClassifier
from mnist_lightning.net import MLP
from mnist_lightning.training import speedups
from mnist_lightning.training.speedups import SmoothedCrossEntropy


def test_network_is_784_128_64_10():
    shapes = [tuple(p.shape) for p in MLP().parameters()]
    assert shapes == [(128, 784), (128,), (64, 128), (64,), (10, 64), (10,)]
    assert MNISTClassifier(hidden1=32, hidden2=16)(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_the_defaults_are_the_recipe():
    model = MNISTClassifier()
    assert (model.hparams.lr, model.hparams.scheduler, model.hparams.label_smoothing) == (5e-3, "onecycle", 0.1)
    assert model.loss.label_smoothing == 0.1


def test_the_fast_loss_matches_torchs_label_smoothing_in_value_and_gradient():
    speedups.configure("all")  # another test may have left them off
    torch.manual_seed(0)
    logits, target = torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 10, (32,))
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        for smoothing in (0.1, 0.5):
            ours = logits.to(dtype, copy=True).requires_grad_()
            theirs = logits.to(dtype, copy=True).requires_grad_()
            loss = SmoothedCrossEntropy(smoothing)(ours, target)
            expected = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(theirs, target)
            loss.backward()
            expected.backward()
            # Equal to rounding: the two sum the same terms in another order.
            torch.testing.assert_close(loss, expected, rtol=tolerance, atol=0)
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=10 * tolerance, atol=tolerance / 100)
    # An empty batch (a DDP rank's share of a tiny set) adds nothing, where torch's mean would be NaN.
    assert SmoothedCrossEntropy(0.1)(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)).item() == 0


def test_what_model_py_declares_is_what_runs(monkeypatch):
    """The loss that model.py constructs is the one the summary lists and training calls; the switch only
    changes how it computes, never what. No class of ours overrides attribute setting."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    logits, target = torch.randn(16, 10), torch.randint(0, 10, (16,))
    for setting in ("all", "none"):
        monkeypatch.setenv("MNIST_LIGHTNING_SPEEDUPS", setting)
        speedups.configure()
        model = MNISTClassifier()
        model.setup("fit")
        assert type(model.loss) is SmoothedCrossEntropy and not list(model.loss.buffers())
        assert "SmoothedCrossEntropy" in str(ModelSummary(model))
        expected = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
        torch.testing.assert_close(model.loss(logits, target), expected)
    assert "self.loss = SmoothedCrossEntropy(label_smoothing)" in Path(model_module.__file__).read_text()
    speedups.configure("all")
    ours = [c for c in MNISTClassifier.__mro__ if c.__module__.startswith("mnist_lightning")]
    assert ours == [MNISTClassifier] and "__setattr__" not in vars(MNISTClassifier)


def test_epoch_metrics_weigh_each_sample_and_keep_a_nan():
    metrics = LossAndAccuracy()
    hit = torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), 10).float()
    metrics.update(torch.tensor(1.0), hit, torch.tensor([1, 2, 3]))  # 3 samples, all right
    metrics.update(torch.tensor(5.0), hit[:1], torch.tensor([7]))  # a short last batch, wrong
    values = metrics.compute()
    assert values["loss"].item() == 2.0 and values["acc"].item() == 0.75  # (3 * 1 + 5) / 4, 3 / 4
    metrics.update(torch.tensor(float("nan")), hit[:1], torch.tensor([1]))
    assert metrics.compute()["loss"].isnan()
    metrics.reset()
    metrics.update(torch.tensor(float("nan")), hit[:0], torch.tensor([], dtype=torch.long))  # an empty shard
    metrics.update(torch.tensor(3.0), hit[:2], torch.tensor([1, 2]))
    assert metrics.compute()["loss"].item() == 3.0 and metrics.compute()["acc"].item() == 1.0


def test_loss_falls_on_a_tiny_batch():
    torch.manual_seed(0)
    model = MNISTClassifier(lr=1e-2, scheduler="none", label_smoothing=0.0)
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(30):
        loss = model.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_the_confusion_matrix_is_legible():
    from mnist_lightning.training import figures as report

    matrix = torch.eye(10, dtype=torch.long) * 1013  # four-digit counts, the real test set's size
    matrix[3, 8] = 1
    figure = report.confusion_figure(matrix)
    axes = figure.axes[0]
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("Predicted class", "True class")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)  # what TensorBoard's add_figure renders with
    canvas.draw()
    renderer = canvas.get_renderer()
    origin, one = axes.transData.transform([(0, 0), (1, 1)])
    cell = abs(one[0] - origin[0])  # a cell's width in pixels
    texts = {text.get_text(): text for text in axes.texts}
    assert texts["1013"].get_window_extent(renderer).width < 0.9 * cell  # the count fits its cell
    image = axes.images[0]
    lone_mistake, nothing = (image.cmap(image.norm(v)) for v in (1.0, 0.0))
    assert max(abs(a - b) for a, b in zip(lone_mistake, nothing, strict=True)) > 0.1  # one mistake shows


def test_the_misread_digits_are_captioned():
    from mnist_lightning.training import figures as report

    images = torch.rand(10, 1, 28, 28)
    figure = report.mistakes_figure(images, torch.arange(10), torch.arange(10).flip(0), columns=4)
    (axes,) = figure.axes
    assert [t.get_text() for t in axes.texts][:2] == ["0 read as 9", "1 read as 8"] and len(axes.texts) == 10
    grid = axes.images[0].get_array()
    assert grid.shape == (3 * (30 + 8), 4 * 30)  # three rows of four cells, each with its caption
    # The second digit, dark on white and scaled to 0-1, sits in its cell under its caption.
    expected = 1 - (images[1, 0] - images[1, 0].min()) / (images[1, 0].max() - images[1, 0].min() + 1e-8)
    assert torch.allclose(torch.as_tensor(grid[9:37, 31:59]), expected, atol=1e-6)


def test_tensorboard_tags_are_the_metric_keys_and_the_rate_is_always_lr(tmp_path):
    """One spelling per metric: TensorBoard shows the keys the console and metrics.json show; the learning
    rate is lr with a schedule or without one (LearningRateMonitor then calls it lr-AdamW)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mnist_lightning.training.tensorboard import RunLogger

    logger = RunLogger(tmp_path, version=0)
    logger.log_metrics({"train/loss": 1.0, "val/acc_best": 0.5, "lr-AdamW": 1e-3, "epoch": 0}, step=1)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["lr", "train/loss", "val/acc_best"]
