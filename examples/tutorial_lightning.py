"""The classic PyTorch MNIST tutorial in six steps: a 784-128-64-10 MLP, cross-entropy, Adam, 5 epochs.

tutorial_pytorch.py takes them in plain PyTorch, tutorial_lightning.py in Lightning; their diff is the
lesson (docs/lesson.md): diff -u -w examples/tutorial_pytorch.py examples/tutorial_lightning.py
"""

import argparse

import lightning as L
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
class MNISTData(L.LightningDataModule):
    def __init__(self, data_dir):
        super().__init__()
        self.data_dir = data_dir

    def prepare_data(self):  # the download: Lightning runs it in one process a machine, before setup
        datasets.MNIST(root=self.data_dir, train=True, download=True)
        datasets.MNIST(root=self.data_dir, train=False, download=True)

    def setup(self, stage):  # the datasets: Lightning builds them in every process (one a GPU under DDP)
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        self.train_set = datasets.MNIST(root=self.data_dir, train=True, transform=transform)
        self.test_set = datasets.MNIST(root=self.data_dir, train=False, transform=transform)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=64)


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        # 2. Define the network: 784 pixels in, 10 scores out (one a digit), two hidden layers with ReLU.
        self.model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

        # 3. The loss: cross-entropy between the ten scores and the true digit.
        self.loss_fn = nn.CrossEntropyLoss()

    # 4. The optimiser: Adam at a fixed learning rate.
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    # 5. Train: one step of the loop; the Trainer zeroes the gradients, calls backward and steps Adam.
    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.loss_fn(self.model(images), labels)
        self.log("loss", loss, on_epoch=True, prog_bar=True)
        return loss

    # 6. Evaluate: the share of the test digits that the network reads right, batch by batch; Lightning
    # averages the batches weighted by their size, switches to eval mode and turns gradients off.
    def test_step(self, batch, batch_idx):
        images, labels = batch
        correct = (self.model(images).argmax(1) == labels).sum()
        self.log("test_acc", correct / len(labels), batch_size=len(labels))


# The Trainer runs the loops of steps 5 and 6. No logger and no checkpoints, so that, like the plain
# script, it writes nothing (the package keeps both, docs/lesson.md); no summary: the network is above.
trainer = L.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_model_summary=False)
model, data = Classifier(), MNISTData(args.data_dir)
trainer.fit(model, datamodule=data)
result = trainer.test(model, datamodule=data)
print(f"test accuracy: {result[0]['test_acc']:.4f}")
