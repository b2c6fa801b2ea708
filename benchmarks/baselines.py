"""The two plain-PyTorch references that the Lightning fit is measured against (no Lightning here).

(a) ``tutorial``: the PyTorch MNIST tutorial as written: torchvision's MNIST with per-sample ToTensor and
    Normalize, a shuffling DataLoader at batch 64, Adam 1e-3 for 5 epochs, then the test set.
(b) ``in_memory``: the lower bound: the same network and fused Adam over tensors already in memory,
    batches cut by index slicing, no DataLoader, no validation, no metrics.
Both return test accuracy, training-loop seconds, optimizer steps and training samples seen; (b) also
each epoch's seconds.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Plain PyTorch, as a user would write it: no project code, so no Lightning, whose import alone adds
# about 2 s to a process's start and exit (and, without a GPU, an NVML probe to every optimizer step).


COMPILE_MODES = ["default", "reduce-overhead", "max-autotune"]  # torch.compile's, as fit's --model.compile_mode


def mlp() -> nn.Sequential:
    """The 784-128-64-10 network, as the tutorial writes it."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def read_idx(path: Path) -> torch.Tensor:
    """A uint8 IDX file: 4 magic bytes (the last one the number of dimensions), the sizes, the data."""
    raw = path.read_bytes()
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3])]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * raw[3]).view(shape)


def loop_seconds(epoch_seconds: list[float], compiled: bool) -> float:
    """A run's training-loop time; compiled, its first epoch (which compiles) is left out and the rest scaled."""
    if compiled and len(epoch_seconds) > 1:
        return sum(epoch_seconds[1:]) / (len(epoch_seconds) - 1) * len(epoch_seconds)
    return sum(epoch_seconds)


def tutorial(data_dir: str, epochs: int = 5, batch_size: int = 64, seed: int = 0) -> dict:
    from torchvision import datasets, transforms  # here, so that (b) does not pay for importing it

    torch.manual_seed(seed)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train = datasets.MNIST(data_dir, train=True, transform=tf)
    test = datasets.MNIST(data_dir, train=False, transform=tf)
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=1000)
    net = mlp()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        correct = sum((net(x).argmax(1) == y).sum().item() for x, y in test_loader)
    steps = epochs * len(train_loader)
    return {"test_acc": correct / len(test), "train_s": seconds, "steps": steps, "samples": epochs * len(train)}


def in_memory(
    data_dir: str,
    epochs: int = 5,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    train_size: int = 55_000,
    compile: str | None = None,
) -> dict:
    """``train_size`` defaults to the size of the fit's training split, so that both see the same samples.

    ``compile`` is a torch.compile mode; compiled, the first epoch (which compiles) is left out and the others
    scaled to ``epochs``.
    """
    torch.manual_seed(seed)
    x, y, xt, yt = (
        read_idx(Path(data_dir, "MNIST", "raw", f"{name}-ubyte"))
        for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    )
    x, y = x[:train_size], y[:train_size]
    x, xt = ((t.to(device).float() / 255 - 0.5) / 0.5 for t in (x, xt))
    y, yt = y.long().to(device), yt.long().to(device)
    net = mlp().to(device)
    if compile:
        net.compile(mode=compile)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)  # as fit's, the fastest Adam
    epoch_s = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(y), device=device)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
        if device != "cpu":
            torch.cuda.synchronize()
        epoch_s.append(time.perf_counter() - start)
    seconds = loop_seconds(epoch_s, bool(compile))
    with torch.no_grad():
        accuracy = (net(xt).argmax(1) == yt).float().mean().item()
    steps = epochs * -(-len(y) // batch_size)
    return {"test_acc": accuracy, "train_s": seconds, "steps": steps, "samples": epochs * len(y), "epoch_s": epoch_s}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run one baseline and print its figures as JSON.")
    parser.add_argument("which", choices=["tutorial", "in_memory"])
    parser.add_argument("data_dir")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="in_memory only: torch.compile the network in this mode",
    )
    args = parser.parse_args()
    kwargs = {"epochs": args.epochs, "batch_size": args.batch_size}
    if args.which == "in_memory":
        kwargs.update(device=args.device, compile=args.compile)
    print(json.dumps((tutorial if args.which == "tutorial" else in_memory)(args.data_dir, **kwargs)))
