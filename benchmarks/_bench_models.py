"""Models and the loss shared by the benchmark scripts (digits: flat 64 pixels, 10 classes)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

CRITERION = nn.CrossEntropyLoss()


def load_digits(device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as flat pixels in [0, 1], shuffled with ``seed``, on ``device``."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm].to(device), y[perm].to(device)


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy of ``model`` on ``(x, y)``: the ``loss_fn(model, batch)`` protocol."""
    x, y = batch
    return CRITERION(model(x), y)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity shortcut."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


def resnet_digits(width: int = 16) -> nn.Module:
    """A ResNet-8-like stem and three basic blocks with BatchNorm, on 8x8 digits given as 64 pixels."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[BasicBlock(width) for _ in range(3)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )
