"""A small LightningModule on digits, and a reader for TensorBoard event files."""

from __future__ import annotations

import glob

import pytorch_lightning as pl
import torch
from _models import digits, digits_mlp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsModule(pl.LightningModule):
    def __init__(self, lr: float = 0.1, momentum: float = 0.0, optimizer: str = "sgd", model: nn.Module | None = None):
        super().__init__()
        self.lr, self.momentum, self.optimizer = lr, momentum, optimizer
        self.net = model if model is not None else digits_mlp()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def loaders(n_train: int = 256, n_val: int = 128, batch_size: int = 64, shuffle: bool = True):
    x, y = digits(n_train + n_val)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=shuffle)
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=batch_size)
    return train, val


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def fitted_weights(tmp_path, callbacks, n_train: int = 256, validate: bool = False) -> dict[str, torch.Tensor]:
    """The weights after a deterministic 2-epoch fit of ``DigitsModule(lr=0.1, momentum=0.9)`` (seed 0, batches of
    32) with ``callbacks``: run once without and once with a callback, they say whether it changed training."""
    torch.manual_seed(0)
    train, val = loaders(n_train=n_train, batch_size=32)
    module = DigitsModule(lr=0.1, momentum=0.9)
    trainer(tmp_path, callbacks, max_epochs=2, deterministic=True, logger=False).fit(
        module, train, val if validate else None
    )
    return {k: v.clone() for k, v in module.state_dict().items()}


def read_events(log_dir) -> EventAccumulator:
    """All scalars, images and texts in the event files under ``log_dir``."""
    files = sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True))
    assert files, f"no event file under {log_dir}"
    acc = EventAccumulator(str(files[0].rsplit("/", 1)[0]), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_steps(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}
