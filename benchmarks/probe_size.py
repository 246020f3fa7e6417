#!/usr/bin/env python
"""How large a probe must be for repeated measurements on the same weights to agree.

    python benchmarks/probe_size.py            # the quickstart CNN after 8 epochs of SGD; --seeds for more models

Trains the quickstart's CNN on digits (examples/quickstart.py, 1,400 training images), then measures the top
Hessian eigenvalue (Lanczos, tol 1e-4) and the trace (Hutch++, 99 products) on disjoint probes of 64, 128, 256, 512
and 1,024 training samples drawn from the training set, and prints, per probe size, the spread over the disjoint
probes: coefficient of variation (std / mean) and max / min. A default probe size is "large enough" where the
coefficient of variation of λ1 falls under 10%. ``--label-noise 0.2`` flips that share of the training labels (to
another class, fixed by the seed) before training: the quickstart's setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from quickstart import DigitsCNN, digits_loaders

from lightning_landscape import functional as LF


def loss_fn(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def flip_labels(dataset: torch.utils.data.TensorDataset, share: float, seed: int) -> None:
    """Replace ``share`` of the labels by another class (uniform over the other nine), fixed by ``seed``."""
    x, y = dataset.tensors
    g = torch.Generator().manual_seed(100 + seed)
    flip = torch.rand(len(y), generator=g) < share
    y = y.clone()
    y[flip] = (y[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=g)) % 10
    dataset.tensors = (x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1, help="trained models")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--label-noise", type=float, default=0.0, help="share of training labels flipped")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# benchmarks/probe_size.py; torch {torch.__version__}; quickstart CNN, {args.epochs} epochs of SGD, "
          f"label noise {args.label_noise}")  # fmt: skip
    print(f"{'seed':>4} {'samples':>7} {'probes':>6} {'λ1 mean':>9} {'λ1 CV':>7} {'λ1 max/min':>10} "
          f"{'trace mean':>10} {'trace CV':>8}")  # fmt: skip
    for seed in range(args.seeds):
        pl.seed_everything(seed, verbose=False)
        train, _ = digits_loaders(1400, batch_size=32, seed=seed)
        if args.label_noise:
            flip_labels(train.dataset, args.label_noise, seed)
        model = DigitsCNN()
        pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu").fit(model, train)  # fmt: skip
        model.eval()
        x, y = train.dataset.tensors
        for size in (64, 128, 256, 512, 1024):
            probes = [(x[i : i + size], y[i : i + size]) for i in range(0, len(x) - size + 1, size)][:8]
            if len(probes) < 2:
                continue
            gen = torch.Generator().manual_seed(0)
            lam = [float(LF.hessian_eigenvalues(model.net, loss_fn, [p], tol=1e-4, generator=gen).eigenvalues[0])
                   for p in probes]  # fmt: skip
            tr = [LF.hessian_trace(model.net, loss_fn, [p], num_hvps=99, generator=gen).estimate for p in probes]
            cv = statistics.stdev(lam) / statistics.mean(lam)
            print(f"{seed:>4} {size:>7} {len(probes):>6} {statistics.mean(lam):>9.3f} {cv:>7.1%} "
                  f"{max(lam) / min(lam):>10.2f} {statistics.mean(tr):>10.1f} "
                  f"{statistics.stdev(tr) / statistics.mean(tr):>8.1%}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
