import torch

from mnist_lightning.model import MLP, MNISTClassifier


def test_network_is_784_128_64_10():
    shapes = [tuple(p.shape) for p in MLP().parameters()]
    assert shapes == [(128, 784), (128,), (64, 128), (64,), (10, 64), (10,)]
    assert MNISTClassifier(hidden1=32, hidden2=16)(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_loss_falls_on_a_tiny_batch():
    torch.manual_seed(0)
    model = MNISTClassifier(lr=1e-2)
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
