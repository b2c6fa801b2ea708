"""The 784-128-64-10 MLP on MNIST, trained with PyTorch Lightning."""
