"""What watching costs: the quickstart fit with the callbacks on, over the same fit with them off.

    python benchmarks/overhead.py                          # default callbacks: no schedule, 5% budget
    python benchmarks/overhead.py --schedule quickstart    # the quickstart's own: everything, every epoch
    python benchmarks/overhead.py --schedule steps --every-n-train-steps 100
    python benchmarks/overhead.py --schedule idle         # attached, (almost) never measuring: the hooks' cost
    python benchmarks/overhead.py --schedule bare         # three empty pl.Callback(): what any callback costs
    python benchmarks/overhead.py --model mlp --schedule idle   # a ~1 ms-step MLP: the hooks' cost at its largest

Runs the quickstart's CNN on digits (examples/quickstart.py) for ``--epochs`` epochs, alternating fits
without and with the three callbacks, ``--repeats`` times each, and prints the median wall times, their
ratio, how many measurements each callback took and the share of the fit they report spending. With
``--schedule default`` the callbacks are built with no arguments at all: HessianCallback(),
SharpnessCallback(), LossLandscapeCallback(), which together keep to 5% of the fit's wall time.
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
from pytorch_lightning.trainer import call

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from quickstart import DigitsCNN, default_callbacks, digits_loaders

from lightning_landscape import HessianCallback, LossLandscapeCallback, SharpnessCallback


def _callbacks(schedule: str, every: int) -> list[pl.Callback]:
    if schedule == "quickstart":
        return default_callbacks()
    if schedule == "bare":
        return [pl.Callback() for _ in range(3)]
    if schedule == "idle":
        return [cls(max_overhead=1e-9) for cls in (HessianCallback, SharpnessCallback, LossLandscapeCallback)]
    if schedule == "steps":
        return [
            HessianCallback(every_n_train_steps=every),
            SharpnessCallback(every_n_train_steps=every),
            LossLandscapeCallback(every_n_train_steps=every),
        ]
    return [HessianCallback(), SharpnessCallback(), LossLandscapeCallback()]


def _counting(cb: pl.Callback) -> list[int]:
    steps: list[int] = []
    measure = cb.measure

    def counted(trainer: pl.Trainer, pl_module: pl.LightningModule):
        steps.append(trainer.global_step)
        return measure(trainer, pl_module)

    cb.measure = counted
    return steps


class _HookClock:
    """Seconds spent in Lightning's dispatch of callback hooks (our measurements included), per fit, and
    when the training loop began (first ``on_train_batch_start``) and ended (``on_train_end``).

    A share of one fit, so it does not move with the machine's load the way whole-fit times do; the two
    marks tell a one-time cost (before the first batch, after the last) from a per-step one.
    """

    def __init__(self) -> None:
        self.reset()
        self._dispatch = call._call_callback_hooks

        def timed(trainer, hook_name, *args, **kwargs):
            start = time.perf_counter()
            if hook_name == "on_train_batch_start" and self.loop_start is None:
                self.loop_start = start
            elif hook_name == "on_train_end":
                self.loop_end = start
            try:
                return self._dispatch(trainer, hook_name, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        call._call_callback_hooks = timed

    def reset(self) -> None:
        self.seconds = 0.0
        self.loop_start: float | None = None
        self.loop_end: float | None = None


HOOKS = _HookClock()


class DigitsMLP(pl.LightningModule):
    """A 64-32-10 MLP on the same data: steps of about 1 ms, where a callback's per-step cost shows most."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


MODELS = {"cnn": DigitsCNN, "mlp": DigitsMLP}
MODEL = "cnn"


def _fit(epochs: int, callbacks: list[pl.Callback], accelerator: str) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds of one fit (and ``HOOKS``' figures for it)."""
    HOOKS.reset()
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders(1400, batch_size=32, seed=0)
    trainer = pl.Trainer(
        max_epochs=epochs, logger=pl.loggers.TensorBoardLogger("/tmp/overhead_logs"), callbacks=callbacks,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, accelerator=accelerator,
        devices=1,
    )  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(MODELS[MODEL](), train, val)
    end = time.perf_counter()
    PHASES.append((HOOKS.loop_start - start, HOOKS.loop_end - HOOKS.loop_start, end - HOOKS.loop_end))
    return end - start, time.process_time() - cpu


PHASES: list[tuple[float, float, float]] = []  # per fit: before the first batch, the loop, after it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="the quickstart trains 8")
    parser.add_argument("--schedule", choices=("default", "quickstart", "steps", "idle", "bare"), default="default")
    parser.add_argument("--every-n-train-steps", type=int, default=200, help="with --schedule steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--model", choices=tuple(MODELS), default="cnn", help="cnn: the quickstart's; mlp: ~1 ms steps")
    args = parser.parse_args(argv)
    global MODEL
    MODEL = args.model
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()})"
    print(f"# benchmarks/overhead.py {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"device {device}; torch {torch.__version__}; pytorch-lightning {pl.__version__}; {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}"
    )
    name = "quickstart CNN" if args.model == "cnn" else "digits MLP"
    print(f"{name}, {args.epochs} epochs ({args.epochs * 44} steps), schedule: {args.schedule}")
    for callbacks in ([], _callbacks(args.schedule, args.every_n_train_steps)):  # untimed: one-time costs
        _fit(1, callbacks, args.device)
    off, on, off_cpu, on_cpu, counts, shares, hooks_off, hooks_on = [], [], [], [], [], [], [], []
    phases_off: list[tuple[float, float, float]] = []
    phases_on: list[tuple[float, float, float]] = []
    for repeat in range(args.repeats):
        for with_callbacks in (False, True) if repeat % 2 == 0 else (True, False):  # ABBA: drift cancels
            if not with_callbacks:
                wall, cpu = _fit(args.epochs, [], args.device)
                off.append(wall)
                off_cpu.append(cpu)
                phases_off.append(PHASES[-1])
                hooks_off.append(HOOKS.seconds / wall)
                continue
            cbs = _callbacks(args.schedule, args.every_n_train_steps)
            measured = {type(cb).__name__: _counting(cb) for cb in cbs if hasattr(cb, "measure")}
            wall, cpu = _fit(args.epochs, cbs, args.device)
            on.append(wall)
            on_cpu.append(cpu)
            phases_on.append(PHASES[-1])
            hooks_on.append((HOOKS.seconds - sum(getattr(cb, "_spent_seconds", 0.0) for cb in cbs)) / wall)
            counts.append({name: len(steps) for name, steps in measured.items()})
            shares.append(sum(getattr(cb, "_spent_seconds", 0.0) for cb in cbs) / on[-1])
    t_off, t_on = statistics.median(off), statistics.median(on)
    print(f"fit without callbacks  median {t_off:.2f} s  {[round(t, 2) for t in off]}")
    print(f"fit with callbacks     median {t_on:.2f} s  {[round(t, 2) for t in on]}")
    print(f"measurements per fit   {counts[-1]}  (last repeat; steps: {dict(measured)})")
    print(f"callbacks' own time    {100 * statistics.median(shares):.1f}% of the fit with them (median)")
    print(f"overhead               {100 * (t_on / t_off - 1):+.1f}%  (target at most +5% at the default schedule)")
    h_off, h_on = 100 * statistics.median(hooks_off), 100 * statistics.median(hooks_on)
    total = h_on - h_off + 100 * statistics.median(shares)
    print(
        f"callback hooks         {h_off:.2f}% of the fit without, {h_on:.2f}% with (measuring excluded): "
        f"{h_on - h_off:+.2f} points; with the callbacks' own time {total:.1f}% (load-independent estimate)"
    )
    c_off, c_on = statistics.median(off_cpu), statistics.median(on_cpu)
    print(f"process CPU time       {c_off:.2f} s without, {c_on:.2f} s with: {100 * (c_on / c_off - 1):+.1f}%")
    steps = args.epochs * 44
    for i, phase in enumerate(("before the first batch", "training loop", "after the loop")):
        p_off = statistics.median(p[i] for p in phases_off)
        p_on = statistics.median(p[i] for p in phases_on)
        per_step = f" ({1e3 * p_off / steps:.3f} vs {1e3 * p_on / steps:.3f} ms/step)" if i == 1 else ""
        print(f"{phase:<22} {p_off:.3f} s without, {p_on:.3f} s with: {p_on - p_off:+.3f} s{per_step}")


if __name__ == "__main__":
    main()
