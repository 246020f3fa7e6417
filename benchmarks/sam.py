#!/usr/bin/env python
"""Time per training step with ``SAMMixin``'s variants against plain steps: same model, same data, one run.

Plain SAM's floor is 2x for the forward-backward work (two passes per step); the optimizer step, logging and
Lightning's per-step bookkeeping happen once, so where they are a visible part of a step the ratio can fall a
little below 2. ``sam_every_n_steps=k`` pays the second pass on one step in k (about ``1 + 1/k`` of plain);
SAM-ON (``sam_params="norm"``) still runs both passes, but forms, saves and restores ε for the normalization
layers only; LookSAM (``sam_reuse``) adds a few fused operations over the gradients to the plain steps.

Each step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (training_step, backward, the
optimizer step, logging: Lightning's overhead included, the data loader's not). Within one ``Trainer.fit`` the
module switches configuration every ``--block`` steps (the settings may change at any time), cycling
plain, variant 1, plain, variant 2, …, so a machine shared with other work slows all alike. A block starts on a
SAM step of the every-k variants (``k`` = the block length), so each such block holds exactly one SAM step
followed by its plain steps. Reported per variant: the median over rounds of (variant block time / the plain
block just before it), the ratio of the medians of their per-step times, and SAM's own work per SAM step (time
inside the SAM closure minus the two Lightning closures it runs: ascent step, saving and restoring weights and
buffers, the second pass's guard)::

    python benchmarks/sam.py                      # ResNet-like CNN with BatchNorm on 8x8 digits, CPU
    python benchmarks/sam.py --variants sam,norm --rounds 40
    python benchmarks/sam.py --model mlp --device cuda --batch-size 1024
"""

from __future__ import annotations

import argparse
import logging
import os
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

#: name -> (settings, what the issue asks of it on the benchmark ResNet on the CPU)
VARIANTS: dict[str, tuple[dict, str]] = {
    "sam": ({}, ""),
    "every5": ({"sam_every_n_steps": 5}, "<= 1.25x"),
    "norm": ({"sam_params": "norm"}, "<= 1.9x"),
    "every5-reuse": ({"sam_every_n_steps": 5, "sam_reuse": True}, ""),
    "log": ({"sam_log": True}, ""),
}
DEFAULTS = {"sam_every_n_steps": 1, "sam_params": None, "sam_reuse": False, "sam_log": False}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=("mlp", "cnn", "resnet"), default="resnet")
    p.add_argument("--width", type=int, default=16, help="channels (cnn, resnet) or hidden units (mlp)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--variants", default="sam,every5,norm,every5-reuse", help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--block", type=int, default=5, help="steps per block (the k of the every-k variants divides it)")
    p.add_argument("--rounds", type=int, default=12, help="timed (plain block, variant block) pairs per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds at the start")
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
    """Switches ``sam`` and the variant's settings every ``block`` steps: plain, variants[0], plain, variants[1], …"""

    def __init__(self, net: nn.Module, variants: list[str], block: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = net
        self.variants, self.block = variants, block
        self.label = "plain"

    def schedule(self, step: int) -> tuple[int, str]:
        """(block number, label) of ``step``: blocks start one step early, on the every-k variants' SAM step."""
        number = (step + 1) // self.block
        position = number % (2 * len(self.variants))
        return number, ("plain" if position % 2 == 0 else self.variants[position // 2])

    def on_train_batch_start(self, batch, batch_idx):
        _, label = self.schedule(self.global_step)
        if label != self.label:
            self.label = label
            settings = {**DEFAULTS, **VARIANTS[label][0]} if label != "plain" else {}
            for name, value in settings.items():
                setattr(self, name, value)
            self.sam = label != "plain"

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


class StepTimer(pl.Callback):
    """Wall time of each step, by block (CUDA synchronized): ``blocks[number] = (label, [seconds, ...])``."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[str, list[float]]] = {}
        self._t0 = 0.0

    def _now(self, module: pl.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = self._now(pl_module) - self._t0
        number, label = pl_module.schedule(trainer.global_step - 1)  # the step just taken
        self.blocks.setdefault(number, (label, []))[1].append(elapsed)


def data(batch_size: int, steps: int) -> DataLoader:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    reps = -(-steps * batch_size // len(x))
    return DataLoader(TensorDataset(x.repeat(reps, 1), y.repeat(reps)), batch_size=batch_size, shuffle=True)


class OwnCost:
    """Time inside ``SAMMixin._sam_closure`` minus the time in the Lightning closures it runs, by the module's
    ``label``: what SAM itself adds per SAM step (ascent step, saving and restoring weights and buffers, setting
    up the second pass). Wraps both methods for the duration of a ``with`` block."""

    def __init__(self) -> None:
        self.own: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self._inside = False
        self._label = ""

    def __enter__(self) -> OwnCost:
        self._originals = sam_closure, closure = SAMMixin._sam_closure, Closure.closure
        cost = self

        def timed_sam_closure(module, *args, **kwargs):
            cost._inside, cost._label, t0 = True, module.label, time.perf_counter()
            try:
                return sam_closure(module, *args, **kwargs)
            finally:
                cost._inside = False
                cost.own[cost._label] = cost.own.get(cost._label, 0.0) + time.perf_counter() - t0
                cost.steps[cost._label] = cost.steps.get(cost._label, 0) + 1

        def timed_closure(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return closure(self, *args, **kwargs)
            finally:
                if cost._inside:
                    cost.own[cost._label] = cost.own.get(cost._label, 0.0) - (time.perf_counter() - t0)

        SAMMixin._sam_closure, Closure.closure = timed_sam_closure, timed_closure
        return self

    def __exit__(self, *exc: object) -> None:
        SAMMixin._sam_closure, Closure.closure = self._originals

    def ms_per_sam_step(self, label: str) -> float:
        return 1e3 * self.own.get(label, 0.0) / max(self.steps.get(label, 0), 1)


def main() -> None:
    args = parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    per_round = 2 * len(variants)
    steps = (args.warmup + args.rounds) * per_round * args.block + args.block - 1  # the first block is short
    torch.manual_seed(0)
    net = make_model(args.model, args.width)
    module = Model(net, variants, args.block, sam_adaptive=args.adaptive)
    timer = StepTimer()
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
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"SAM step-time benchmark: torch {torch.__version__}, pytorch-lightning {pl.__version__}, {device}, "
        f"{torch.get_num_threads()} CPU threads, load average {load}"
    )
    print(
        f"model {args.model} (width {args.width}, {sum(p.numel() for p in net.parameters()):,} parameters), "
        f"batch {args.batch_size}, precision {args.precision}, {'ASAM' if args.adaptive else 'SAM'}; "
        f"blocks of {args.block} steps: plain, variant, plain, next variant, ...; {args.rounds} timed rounds "
        f"after {args.warmup} warm-up round(s), one Trainer.fit of {steps} steps"
    )
    start = time.perf_counter()
    with OwnCost() as own:
        trainer.fit(module, data(args.batch_size, steps))
    wall = time.perf_counter() - start
    first_timed = 1 + args.warmup * per_round  # block 0 is short
    blocks = {n: b for n, b in timer.blocks.items() if n >= first_timed and len(b[1]) == args.block}
    plain = [statistics.fmean(ts) for label, ts in blocks.values() if label == "plain"]
    print(f"plain: median {1e3 * statistics.median(plain):.2f} ms/step over {len(plain)} blocks")
    header = f"{'variant':14s} {'ms/step':>8s} {'pair ratio':>11s} {'(IQR)':>15s} {'ratio of medians':>17s}"
    print(f"{header} {'own work/SAM step':>18s}  target")
    for v in variants:
        times = [(n, statistics.fmean(ts)) for n, (label, ts) in blocks.items() if label == v]
        pairs = [t / statistics.fmean(blocks[n - 1][1]) for n, t in times if n - 1 in blocks]
        q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
        med = statistics.median(t for _, t in times)
        print(
            f"{v:14s} {1e3 * med:8.2f} {statistics.median(pairs):10.3f}x {f'({q[0]:.3f}-{q[2]:.3f})':>15s} "
            f"{med / statistics.median(plain):16.3f}x {own.ms_per_sam_step(v):15.2f} ms  {VARIANTS[v][1]}"
        )
    print(f"wall time {wall:.1f} s")


if __name__ == "__main__":
    main()
