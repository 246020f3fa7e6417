#!/usr/bin/env python
"""Time per training step with and without ``SAMMixin``: same model, same data, same Trainer settings, one run.

The floor is 2x for the forward-backward work (SAM runs two passes per step); the optimizer step, logging and
Lightning's per-step bookkeeping happen once, so where they are a visible part of a step the ratio can fall a
little below 2. Each step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (training_step,
backward, the optimizer step, logging: Lightning's overhead included, the data loader's not). Within one
``Trainer.fit`` the module switches ``sam`` on and off at alternate steps (the flag may change at any time),
so a machine shared with other work slows both alike; reported are medians, minima, the median over
neighbouring (off, on) pairs of their ratio, and SAM's own work per step (time inside the SAM closure minus
the two Lightning closures it runs: the ascent step, saving and restoring weights and buffers)::

    python benchmarks/sam.py                      # ResNet-like CNN with BatchNorm on 8x8 digits, CPU
    python benchmarks/sam.py --model mlp --device cuda --batch-size 1024
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from _bench_models import resnet_digits
from pytorch_lightning.loops.optimization.automatic import Closure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.sam import SAMMixin


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=("mlp", "cnn", "resnet"), default="resnet")
    p.add_argument("--width", type=int, default=16, help="channels (cnn, resnet) or hidden units (mlp)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300, help="timed steps (half of them SAM steps)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps at the start")
    p.add_argument("--adaptive", action="store_true", help="ASAM instead of SAM")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    return p.parse_args()


def make_model(name: str, width: int) -> nn.Module:
    """Small models on the 8x8 digits (inputs are the flat 64 pixels)."""
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    if name == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * width, 10),
        )
    return resnet_digits(width)  # a ResNet-8-like stem + 3 basic blocks with BatchNorm


class Model(SAMMixin, pl.LightningModule):
    def __init__(self, net: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = net

    def on_train_batch_start(self, batch, batch_idx):
        self.sam = batch_idx % 2 == 1  # alternate: off, on, off, on, ...

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


class StepTimer(pl.Callback):
    """Wall time of each training step after ``warmup`` steps, by the module's ``sam`` (CUDA synchronized)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[tuple[bool, float]] = []
        self._t0 = 0.0

    def _now(self, module: pl.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = self._now(pl_module) - self._t0
        if trainer.global_step > self.warmup:
            self.times.append((pl_module.sam, elapsed))


def data(batch_size: int, steps: int) -> DataLoader:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    reps = -(-steps * batch_size // len(x))
    return DataLoader(TensorDataset(x.repeat(reps, 1), y.repeat(reps)), batch_size=batch_size, shuffle=True)


class OwnCost:
    """Time inside ``SAMMixin._sam_closure`` minus the time in the Lightning closures it runs: what SAM itself
    adds per step (ascent step, saving and restoring weights and buffers, setting up the second pass).
    Wraps both methods for the duration of a ``with`` block."""

    def __init__(self) -> None:
        self.own = 0.0
        self.steps = 0
        self._inside = False

    def __enter__(self) -> OwnCost:
        self._originals = sam_closure, closure = SAMMixin._sam_closure, Closure.closure
        cost = self

        def timed_sam_closure(module, *args, **kwargs):
            cost._inside, t0 = True, time.perf_counter()
            try:
                return sam_closure(module, *args, **kwargs)
            finally:
                cost._inside = False
                cost.own += time.perf_counter() - t0
                cost.steps += 1

        def timed_closure(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return closure(self, *args, **kwargs)
            finally:
                if cost._inside:
                    cost.own -= time.perf_counter() - t0

        SAMMixin._sam_closure, Closure.closure = timed_sam_closure, timed_closure
        return self

    def __exit__(self, *exc: object) -> None:
        SAMMixin._sam_closure, Closure.closure = self._originals

    def ms_per_step(self) -> float:
        return 1e3 * self.own / max(self.steps, 1)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    steps = args.warmup + args.steps + args.steps % 2
    torch.manual_seed(0)
    net = make_model(args.model, args.width)
    module = Model(net, sam_adaptive=args.adaptive)
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"SAM step-time benchmark: torch {torch.__version__}, pytorch-lightning {pl.__version__}, {device}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(
        f"model {args.model} (width {args.width}, {sum(p.numel() for p in net.parameters()):,} parameters), "
        f"batch {args.batch_size}, precision {args.precision}, {'ASAM' if args.adaptive else 'SAM'}; "
        f"{args.steps} timed steps alternating off/on after {args.warmup} warm-up steps, one Trainer.fit"
    )
    start = time.perf_counter()
    with OwnCost() as own:
        trainer.fit(module, data(args.batch_size, steps))
    wall = time.perf_counter() - start
    off = [t for sam, t in timer.times if not sam]
    on = [t for sam, t in timer.times if sam]
    pairs = [b / a for (sa, a), (sb, b) in zip(timer.times[::2], timer.times[1::2], strict=False) if not sa and sb]
    for name, ts in (("without SAM", off), ("with SAM", on)):
        med, low = 1e3 * statistics.median(ts), 1e3 * min(ts)
        print(f"{name:12s} median {med:8.2f} ms/step, min {low:8.2f} ({len(ts)} steps)")
    print(f"ratio of medians       {statistics.median(on) / statistics.median(off):6.3f}x")
    print(f"ratio of minima        {min(on) / min(off):6.3f}x")
    print(f"median of pair ratios  {statistics.median(pairs):6.3f}x  (floor 2x: two forward-backward passes)")
    print(f"SAM's own work (outside both forward-backward passes): {own.ms_per_step():.2f} ms/step (mean)")
    print(f"wall time {wall:.1f} s")


if __name__ == "__main__":
    main()
