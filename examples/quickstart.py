"""Quickstart: a small CNN on scikit-learn's digits with all three lightning-landscape callbacks.

    python examples/quickstart.py            # plain SGD, ~1 minute on a laptop CPU
    python examples/quickstart.py --sam      # the same with SAMMixin's flag on
    python examples/quickstart.py --fast     # a few seconds (the CI smoke test)

Then look at the pictures: ``tensorboard --logdir lightning_logs``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import HessianCallback, LossLandscapeCallback, SAMMixin, SharpnessCallback


class DigitsCNN(SAMMixin, pl.LightningModule):
    """Two conv layers with BatchNorm, a linear head; SAM settings pass through ``**sam_kwargs``."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9, width: int = 16, **sam_kwargs) -> None:
        super().__init__(**sam_kwargs)
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * width * 16, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def digits_loaders(n_train: int, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Digits as 1x8x8 images in [0, 1]; ``n_train`` for training, the rest for validation."""
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    x = torch.tensor(x, dtype=torch.float32)[order].reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)[order]
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train:], y[n_train:])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(val, batch_size=256),
    )


def default_callbacks(fast: bool = False) -> list[pl.Callback]:
    """The three callbacks at the quickstart's schedule (once per epoch)."""
    return [
        HessianCallback(every_n_epochs=1, top_k=3, trace=True, density=True, num_batches=2,
                        trace_hvps=30 if fast else 99, density_steps=10 if fast else 40),
        SharpnessCallback(every_n_epochs=1, num_batches=2),
        LossLandscapeCallback(every_n_epochs=1, steps=7 if fast else 11),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam", action="store_true", help="train with SAM (SAMMixin's flag)")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--fast", action="store_true", help="two short epochs: a smoke test")
    parser.add_argument("--no-callbacks", action="store_true", help="train without measuring (for timing)")
    parser.add_argument("--logdir", default="lightning_logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-images", metavar="DIR", help="also save the logged TensorBoard images as PNGs")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    n_train = 256 if args.fast else 1400
    train, val = digits_loaders(n_train, batch_size=32, seed=args.seed)
    model = DigitsCNN(sam=args.sam, sam_rho=args.rho)
    logger = pl.loggers.TensorBoardLogger(args.logdir, name="quickstart_sam" if args.sam else "quickstart")
    trainer = pl.Trainer(
        max_epochs=2 if args.fast else args.epochs,
        logger=logger,
        callbacks=[] if args.no_callbacks else default_callbacks(args.fast),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.fast,
        log_every_n_steps=5,
    )
    trainer.fit(model, train, val)

    results = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for cb in trainer.callbacks:
        results.update(getattr(cb, "last_metrics", {}))
    print(f"\n{'metric':<40} value  ({'SAM' if args.sam else 'SGD'})")
    for key in sorted(results):
        print(f"{key:<40} {results[key]:.5g}")
    print(f"\nSee the pictures:  tensorboard --logdir {args.logdir}")
    if args.export_images:  # the last frame of each image tag, bytes unchanged (docs/tensorboard_*.png)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _tensorboard_images import export_images

        for path in export_images(trainer.logger.log_dir, args.export_images):
            print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
