"""What watching costs: the quickstart fit with the callbacks on, over the same fit with them off.

    python benchmarks/overhead.py                       # schedule of the README example: every 200 steps
    python benchmarks/overhead.py --every-n-train-steps 44   # about once per epoch of the quickstart

Runs the quickstart's CNN on digits (examples/quickstart.py) for ``--epochs`` epochs, alternating fits
without and with HessianCallback(top_k=3, trace=True), SharpnessCallback() and LossLandscapeCallback() at
the given schedule, ``--repeats`` times each, and prints the median wall times, their ratio, and what
the callbacks themselves report as their cost (``…/seconds``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from quickstart import DigitsCNN, digits_loaders

from lightning_landscape import HessianCallback, LossLandscapeCallback, SharpnessCallback


def _callbacks(every: int) -> list[pl.Callback]:
    return [
        HessianCallback(every_n_train_steps=every, top_k=3, trace=True),
        SharpnessCallback(every_n_train_steps=every),
        LossLandscapeCallback(every_n_train_steps=every),
    ]


def _fit(epochs: int, callbacks: list[pl.Callback]) -> float:
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders(1400, batch_size=32, seed=0)
    trainer = pl.Trainer(
        max_epochs=epochs, logger=pl.loggers.TensorBoardLogger("/tmp/overhead_logs"), callbacks=callbacks,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, accelerator="auto",
        devices=1,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(DigitsCNN(), train, val)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--every-n-train-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    print(f"# benchmarks/overhead.py {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"device {device}; torch {torch.__version__}; {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    steps = args.epochs * 44
    print(f"quickstart CNN, {args.epochs} epochs ({steps} steps), callbacks every {args.every_n_train_steps} steps")
    off, on, costs = [], [], []
    for _ in range(args.repeats):
        off.append(_fit(args.epochs, []))
        cbs = _callbacks(args.every_n_train_steps)
        on.append(_fit(args.epochs, cbs))
        costs.append({type(cb).__name__: cb.last_metrics.get(f"{cb.prefix}/seconds", 0.0) for cb in cbs})
    t_off, t_on = statistics.median(off), statistics.median(on)
    print(f"fit without callbacks  median {t_off:.2f} s  {[round(t, 2) for t in off]}")
    print(f"fit with callbacks     median {t_on:.2f} s  {[round(t, 2) for t in on]}")
    print(f"overhead               {100 * (t_on / t_off - 1):+.1f}%  (target at most +5%)")
    print("last measurement's own cost (s):", {k: round(v, 3) for k, v in costs[-1].items()})


if __name__ == "__main__":
    main()
