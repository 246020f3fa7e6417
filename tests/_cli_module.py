"""A tiny module and data module for the ``lightning-landscape`` command's tests (named by class_path in
``tests/cli/config.yaml``)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from _models import digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyDigits(pl.LightningDataModule):
    def __init__(self, n_train: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        self.n_train, self.batch_size = n_train, batch_size

    def train_dataloader(self) -> DataLoader:
        x, y = digits(self.n_train)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=True)
