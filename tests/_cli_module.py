"""A tiny module and data module for the ``lightning-landscape`` command's tests (named by class_path in
``tests/cli/config.yaml``)."""

from __future__ import annotations

import pytorch_lightning as pl
from _lightning import DigitsModule
from _models import digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(DigitsModule):
    """The tests' digits module with a 64-hidden-10 tanh MLP, its arguments saved (LightningCLI, checkpoints)."""

    def __init__(self, hidden: int = 8, lr: float = 0.1) -> None:
        super().__init__(lr=lr, model=nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)))
        self.save_hyperparameters()


class TinyDigits(pl.LightningDataModule):
    def __init__(self, n_train: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        self.n_train, self.batch_size = n_train, batch_size

    def train_dataloader(self) -> DataLoader:
        x, y = digits(self.n_train)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=True)
