"""The classic PyTorch MNIST tutorial in six steps: a 784-128-64-10 MLP, cross-entropy, Adam, 5 epochs.

tutorial_pytorch.py takes them in plain PyTorch, tutorial_lightning.py in Lightning; their diff is the
lesson (docs/lesson.md): diff -u -w examples/tutorial_pytorch.py examples/tutorial_lightning.py
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

parser = argparse.ArgumentParser(description="The PyTorch MNIST tutorial: train the MLP, print its test accuracy.")
parser.add_argument("--data_dir", default="data", help="the folder that holds MNIST/raw/; downloaded there if missing")
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()
torch.manual_seed(0)  # the same initial weights and the same batches on every run


# 1. Prepare the data: pixels to [-1, 1], batches of 64, the training images shuffled every epoch.
transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
train_set = datasets.MNIST(root=args.data_dir, train=True, download=True, transform=transform)
test_set = datasets.MNIST(root=args.data_dir, train=False, download=True, transform=transform)
train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
test_loader = DataLoader(test_set, batch_size=64)

# 2. Define the network: 784 pixels in, 10 scores out (one a digit), two hidden layers with ReLU.
model = nn.Sequential(
    nn.Flatten(),
    nn.Linear(28 * 28, 128),
    nn.ReLU(),
    nn.Linear(128, 64),
    nn.ReLU(),
    nn.Linear(64, 10),
)

# 3. The loss: cross-entropy between the ten scores and the true digit.
loss_fn = nn.CrossEntropyLoss()

# 4. The optimiser: Adam at a fixed learning rate.
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

# 5. Train: every epoch, one step a batch: the loss, its gradients, Adam's update.
for epoch in range(args.epochs):
    model.train()
    total = 0.0
    for images, labels in train_loader:
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
    print(f"epoch {epoch + 1}: mean loss {total / len(train_loader):.4f}")

# 6. Evaluate: the share of the test digits that the network reads right.
model.eval()
correct = 0
with torch.no_grad():
    for images, labels in test_loader:
        correct += (model(images).argmax(1) == labels).sum().item()
print(f"test accuracy: {correct / len(test_set):.4f}")
