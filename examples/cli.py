"""LightningCLI: the callbacks and SAM's flag configured from YAML, no Python to edit.

The quickstart's model (``DigitsCNN``, which mixes in ``SAMMixin`` and passes SAM's keywords through
``**sam_kwargs``) and the digits data as a ``LightningDataModule``; ``examples/config.yaml`` sets the
trainer, the TensorBoard logger, the three lightning-landscape callbacks with their arguments, and
``model.sam``. Anything in it can be overridden on the command line:

    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --model.sam=true --model.sam_rho=0.1
    python examples/cli.py fit --config examples/config.yaml --trainer.max_epochs=1 --data.n_train=256
    python examples/cli.py fit --config examples/config.yaml --fast        # a few seconds (the CI smoke test)
    python examples/cli.py fit --print_config                         # every option, with its default

At the end of ``fit`` the last value of every logged metric is printed as a table; the images are in
TensorBoard (``tensorboard --logdir lightning_logs``).

Checkpoints of two such runs (SGD, then SAM) compared after the fact, with no Python: the ``lightning-landscape``
command reads the same YAML (this config's model has no ``class_path``, so the classes are named)::

    python examples/cli.py fit --config examples/config.yaml --trainer.enable_checkpointing=true --trainer.callbacks=[]
    python examples/cli.py fit --config examples/config.yaml --trainer.enable_checkpointing=true \
        --trainer.callbacks=[] --model.sam=true
    PYTHONPATH=examples lightning-landscape compare lightning_logs/cli/version_0/checkpoints/*.ckpt \
        lightning_logs/cli/version_1/checkpoints/*.ckpt --names sgd,sam --config examples/config.yaml \
        --model_class quickstart.DigitsCNN --datamodule_class cli.DigitsDataModule --output cmp
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import DigitsCNN, digits_loaders


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits as 1x8x8 images: ``n_train`` for training, the rest (of 1797) for validation.

    Args:
        n_train: training images.
        batch_size: training batch size.
        seed: seed of the split and of the shuffling.
    """

    def __init__(self, n_train: int = 1400, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        if not 0 < n_train < 1797:
            raise ValueError(f"`n_train` must be between 1 and 1796 (digits has 1797 images), got {n_train}.")
        self.n_train, self.batch_size, self.seed = n_train, batch_size, seed
        self._loaders: tuple[DataLoader, DataLoader] | None = None

    def setup(self, stage: str) -> None:
        if self._loaders is None:
            self._loaders = digits_loaders(self.n_train, self.batch_size, self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loaders[0]

    def val_dataloader(self) -> DataLoader:
        return self._loaders[1]


#: what ``--fast`` stands for (every example takes it): one short epoch on a small model, a smoke test
FAST = ["--trainer.max_epochs=1", "--trainer.limit_val_batches=2", "--data.n_train=128", "--model.width=4"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the last value of every logged metric.

    ``--fast`` (anywhere after the subcommand) adds :data:`FAST`'s overrides after the rest, so they win.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--fast" in argv:
        argv = [a for a in argv if a != "--fast"] + FAST
    cli = LightningCLI(
        DigitsCNN,
        DigitsDataModule,
        args=argv,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )
    results = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for cb in cli.trainer.callbacks:
        results.update(getattr(cb, "last_metrics", {}))
    if results:
        print(f"\n{'metric':<40} value  (sam={cli.model.sam})")
        for key in sorted(results):
            print(f"{key:<40} {results[key]:.5g}")
    logger = cli.trainer.logger
    if logger is not None and getattr(logger, "log_dir", None):
        print(f"\nSee the pictures:  tensorboard --logdir {logger.save_dir}")
    return results


if __name__ == "__main__":
    main()
