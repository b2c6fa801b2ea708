import torch

from mnist_lightning.metrics import LossAndAccuracy
from mnist_lightning.model import MNISTClassifier
from mnist_lightning.net import MLP


def test_network_is_784_128_64_10():
    shapes = [tuple(p.shape) for p in MLP().parameters()]
    assert shapes == [(128, 784), (128,), (64, 128), (64,), (10, 64), (10,)]
    assert MNISTClassifier(hidden1=32, hidden2=16)(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_the_defaults_are_the_recipe():
    model = MNISTClassifier()
    assert (model.hparams.lr, model.hparams.scheduler, model.hparams.label_smoothing) == (5e-3, "onecycle", 0.1)
    assert model.loss.label_smoothing == 0.1


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


def test_report_pictures_have_the_expected_layout():
    from mnist_lightning import report

    matrix = torch.eye(10, dtype=torch.long) * 5
    matrix[3, 8] = 2
    picture = report.confusion_image(matrix)
    assert picture.shape == (11 * report.CELL, 11 * report.CELL, 3) and picture.dtype.name == "uint8"
    cell = picture[4 * report.CELL + 1, 9 * report.CELL + 1]  # row 3 (true), column 8 (predicted)
    assert cell[0] == 255 and cell[1] < 255  # a mistake is tinted red
    assert (picture[1 * report.CELL + 1, 2 * report.CELL + 1] == 255).all()  # an empty cell stays white
    grid = report.mistakes_image(torch.rand(10, 1, 28, 28), torch.arange(10), torch.arange(10).flip(0), columns=4)
    assert grid.shape == (3 * (2 * report.CELL + 14), 4 * 2 * report.CELL, 3)
