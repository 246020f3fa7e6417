"""Quickstart: SGD and SAM on digits with 20% of the training labels flipped, and what the measures say.

    python examples/quickstart.py              # SGD, then SAM (ρ=0.05), 20 epochs each: ~80 s on one CPU core
    python examples/quickstart.py --runs sgd   # one run (``--sam`` is short for ``--runs sam``)
    python examples/quickstart.py --fast       # a few seconds (the CI smoke test)

Each run trains a small CNN with the three lightning-landscape callbacks on their default schedule (a frame after
the first epoch, one at the end, in between as many as fit in 5% of the time) and logs to TensorBoard under
``<logdir>/quickstart/version_N/<run>``: ``tensorboard --logdir lightning_logs`` overlays the runs.

Then both runs' final weights are measured on ONE fixed probe (the first 512 training samples, flipped labels
included) with ``lightning_landscape.functional``, and printed beside what a curvature number must be read
against: validation accuracy, the share of flipped labels the model fits, the loss on the whole training set and
the weight norm. The script ends with a reading of its own numbers: which run is lower on each measure, by what
ratio, and which measures do not separate the runs.

Why label noise: flatness says something only between runs that fit the same data about equally well, or that
differ in what they fit. Stopped at a fixed epoch on clean digits, SAM can end *sharper* than SGD and a reader
concludes it does not work; with flipped labels, SGD fits (memorises) many of them and SAM fits fewer, and the
measures can be read against that. The learning rate is 0.01 (``--lr``): at the model's own 0.05 with momentum
0.9, SGD's large steps kept it from fitting the flipped labels too (6% against SAM's 4% here, seed 0), and
neither validation accuracy nor any curvature measure separated the runs by 20%.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import HessianCallback, LossLandscapeCallback, SAMMixin, SharpnessCallback
from lightning_landscape import functional as LF

#: Ratios (larger / smaller) under this count as "does not separate the runs": well above the ≤3–4% by which
#: λ1 and the trace varied between disjoint 512-sample probes of the same weights.
SEPARATES = 1.2


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


class DigitsTrain(TensorDataset):
    """The training digits; ``flipped`` holds the indices whose label was changed, ``clean_labels`` the originals."""

    def __init__(self, x: Tensor, y: Tensor, clean_labels: Tensor, flipped: Tensor) -> None:
        super().__init__(x, y)
        self.clean_labels = clean_labels
        self.flipped = flipped


def digits_loaders(n_train: int, batch_size: int, seed: int, label_noise: float = 0.0) -> tuple[DataLoader, DataLoader]:
    """Digits as 1x8x8 images in [0, 1]; ``n_train`` for training, the rest for validation.

    ``label_noise``: the fraction of training labels changed to another class (drawn uniformly among the nine),
    reproducible from ``seed``; the validation labels stay clean. The training loader's dataset is a
    :class:`DigitsTrain` (``.flipped``: the changed indices). With ``label_noise=0`` the split and the shuffle
    order are those of earlier versions.
    """
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    x = torch.tensor(x, dtype=torch.float32)[order].reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)[order]
    clean, noisy, flipped = y[:n_train], y[:n_train].clone(), torch.zeros(0, dtype=torch.long)
    if label_noise > 0:  # drawn only then: without noise, ``g`` then shuffles as it always did
        flipped = torch.randperm(n_train, generator=g)[: round(label_noise * n_train)].sort().values
        noisy[flipped] = (clean[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10
    train = DigitsTrain(x[:n_train], noisy, clean, flipped)
    val = TensorDataset(x[n_train:], y[n_train:])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(val, batch_size=256),
    )


def landscape_callbacks(fast: bool = False) -> list[pl.Callback]:
    """The three callbacks on their default schedule (a frame after the first epoch, one at the end, between them
    as many as fit in 5% of the fit's time) with the spectral density, the trace and three eigenvalues on."""
    probe = {"num_samples": 64} if fast else {}
    return [
        HessianCallback(top_k=3, trace=True, trace_hvps=30, density=True, density_probes=2, density_steps=20, **probe),
        SharpnessCallback(**probe),
        LossLandscapeCallback(steps=7 if fast else 11, **probe),
    ]


def default_callbacks(fast: bool = False) -> list[pl.Callback]:
    """Everything, every epoch: the set ``benchmarks/overhead.py --schedule quickstart`` times (the quickstart
    itself now runs :func:`landscape_callbacks`, on the default schedule)."""
    return [
        HessianCallback(every_n_epochs=1, top_k=3, trace=True, density=True, num_batches=2,
                        trace_hvps=30 if fast else 99, density_steps=10 if fast else 40),
        SharpnessCallback(every_n_epochs=1, num_batches=2),
        LossLandscapeCallback(every_n_epochs=1, steps=7 if fast else 11),
    ]  # fmt: skip


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The probe loss for the functional layer: ``loss_fn(model, batch) -> scalar``."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def fit_measures(model: nn.Module, train: DigitsTrain, val: TensorDataset) -> dict[str, float]:
    """Validation accuracy, the share of flipped labels fitted, the training loss (whole set, its clean and its
    flipped samples) and the weight norm of the final model, in eval mode."""
    model.eval()
    x, y = train.tensors
    logits = model(x)
    losses = nn.functional.cross_entropy(logits, y, reduction="none")
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[train.flipped] = True
    val_x, val_y = val.tensors
    return {  # a mean over no samples (no noise) is nan
        "val_acc": (model(val_x).argmax(1) == val_y).float().mean().item(),
        "flipped_fitted": (logits.argmax(1) == y)[flipped].float().mean().item(),
        "train_loss": losses.mean().item(),
        "train_loss_clean": losses[~flipped].mean().item(),
        "train_loss_flipped": losses[flipped].mean().item(),
        "weight_norm": torch.cat([p.detach().flatten() for p in model.parameters()]).norm().item(),
    }


def curvature(model: nn.Module, probe: tuple[Tensor, Tensor], rho: float, fast: bool, seed: int) -> dict[str, float]:
    """λ1, the Hutch++ trace and worst-case ℓ2 sharpness on one probe batch, each from its own seeded generator."""
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    eig = LF.hessian_eigenvalues(model, cross_entropy, [probe], k=1, max_hvps=30 if fast else 100, generator=gen())
    trace = LF.hessian_trace(model, cross_entropy, [probe], num_hvps=30 if fast else 99, generator=gen())
    worst = LF.sharpness(model, cross_entropy, [probe], rho=rho, steps=10 if fast else 20, generator=gen())
    return {"eigenvalue_1": eig.eigenvalues[0].item(), "trace": trace.estimate, "worst_case_l2": float(worst)}


#: (key, row label, format) of the printed table.
ROWS = [
    ("val_acc", "validation accuracy (clean labels)", ".3f"),
    ("flipped_fitted", "share of flipped labels fitted", ".3f"),
    ("train_loss", "training loss, whole set", ".3f"),
    ("train_loss_clean", "  on its clean labels", ".3f"),
    ("train_loss_flipped", "  on its flipped labels", ".3f"),
    ("weight_norm", "weight norm ‖θ‖", ".2f"),
    ("eigenvalue_1", "λ1 (top Hessian eigenvalue)", ".3g"),
    ("trace", "Hessian trace (Hutch++)", ".3g"),
    ("worst_case_l2", "worst-case ℓ2 sharpness", ".3g"),
    ("fit_seconds", "fit wall time (s)", ".1f"),
]
#: The measures the reading compares: (key, name); validation accuracy is compared as an error rate.
COMPARED = [
    ("val_error", "validation error (1 − accuracy)"),
    ("flipped_fitted", "share of flipped labels fitted"),
    ("train_loss", "training loss"),
    ("weight_norm", "weight norm"),
    ("eigenvalue_1", "λ1"),
    ("trace", "Hessian trace"),
    ("worst_case_l2", "worst-case ℓ2 sharpness"),
]


def ratio(a: float, b: float) -> float:
    """Larger over smaller of two values: ``inf`` when they differ in sign or one is zero, ``1`` when equal.

    Example:
        >>> ratio(7.6, 5.8) == ratio(5.8, 7.6), round(ratio(7.6, 5.8), 2), ratio(0.0, 0.0), ratio(0.0, 0.1)
        (True, 1.31, 1.0, inf)
    """
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if a == b:
        return 1.0
    if a * b <= 0:
        return math.inf
    return max(abs(a), abs(b)) / min(abs(a), abs(b))


def compare(values: dict[str, float], threshold: float = SEPARATES) -> tuple[str | None, float]:
    """``(run with the lower value, ratio)``; the run is ``None`` when the ratio is under ``threshold`` (or nan).

    Example:
        >>> compare({"sgd": 7.6, "sam": 5.8})[0], compare({"sgd": 92.0, "sam": 85.0})[0]
        ('sam', None)
    """
    (run_a, a), (run_b, b) = values.items()
    r = ratio(a, b)
    return (run_a if a < b else run_b) if r >= threshold else None, r


def reading(results: dict[str, float], runs: list[str], probe_size: int, label_noise: float) -> list[str]:
    """What the numbers in ``results`` (keys ``"<run>/<measure>"``) say about the first two ``runs``."""
    a, b = runs[:2]
    name = {a: a.upper(), b: b.upper()}

    def value(run: str, key: str) -> float:
        return 1 - results[f"{run}/val_acc"] if key == "val_error" else results[f"{run}/{key}"]

    def lower(key: str) -> tuple[str | None, float]:
        return compare({a: value(a, key), b: value(b, key)})

    lines, flat = [], []
    for key, label in COMPARED:
        if math.isnan(value(a, key) + value(b, key)):  # flipped-label measures without label noise
            continue
        run, r = lower(key)
        times = "inf" if math.isinf(r) else f"{math.floor(r * 100) / 100:.2f}"  # never shown above the true ratio
        shown = f"{name[a]} {value(a, key):.3g} vs {name[b]} {value(b, key):.3g} ({times}x)"
        if run is None:
            lines.append(f"- {label}: {shown}: does not separate the runs here")
            flat.append(key)
        else:
            lines.append(f"- {label}: lower for {name[run]}, {shown}")

    lo = lower("train_loss")[0]
    if lo is None:
        lines.append("- The runs fit the training set about equally well: their curvature is compared at similar loss.")
    elif label_noise > 0:
        hi = b if lo == a else a
        gap = value(hi, "train_loss") - value(lo, "train_loss")
        from_flipped = label_noise * (value(hi, "train_loss_flipped") - value(lo, "train_loss_flipped"))
        fits = (
            f"{name[hi]} fits {value(hi, 'flipped_fitted'):.0%} of them, {name[lo]} {value(lo, 'flipped_fitted'):.0%}"
        )
        if from_flipped > gap / 2 and value(hi, "flipped_fitted") < value(lo, "flipped_fitted"):
            lines.append(
                f"- {name[hi]}'s higher training loss (+{gap:.3f}) is mostly noise it did not fit: the flipped "
                f"{label_noise:.0%} of labels contribute {from_flipped:+.3f} of it ({fits})."
            )
        else:
            lines.append(
                f"- {name[hi]}'s training loss is higher by {gap:.3f}, of which the flipped labels contribute "
                f"{from_flipped:+.3f} ({fits}): it fits the clean labels less well too."
            )

    curvature_keys = [k for k in ("eigenvalue_1", "trace", "worst_case_l2") if k not in flat]
    flatter = {lower(k)[0] for k in curvature_keys}
    better = lower("val_error")[0]
    if len(flatter) > 1:
        lines.append("- The curvature measures disagree on which run is flatter.")
    elif flatter:
        (run,) = flatter
        by = f"- {name[run]} is flatter by {len(curvature_keys)} of 3 curvature measures"
        if better is None:
            lines.append(f"{by}; the validation error does not separate the runs.")
        elif run == better:
            lines.append(f"{by} and has the lower validation error.")
        else:
            lines.append(f"{by} but has the HIGHER validation error: flatness did not predict generalization here.")
    labels = dict(COMPARED)
    lines.append(
        f"- Not separating the runs (ratio under {SEPARATES}x): {', '.join(labels[k] for k in flat) or 'none'}. "
        "One seed: rerun with --seed 1 before trusting a ratio near the line."
    )
    lines.append(
        f"- All curvature numbers are on the same {probe_size}-sample probe of the training set"
        + (" (flipped labels included)" if label_noise > 0 else "")
        + ". Worst-case sharpness shrinks as the probe grows: compare it only at equal probe size."
    )
    return lines


def train_run(run: str, args: argparse.Namespace, logger: pl.loggers.Logger) -> dict[str, float]:
    """Fit one run (``"sgd"`` or ``"sam"``) from the seed's initial weights and measure its final model."""
    pl.seed_everything(args.seed, verbose=False)
    train, val = digits_loaders(args.n_train, batch_size=32, seed=args.seed, label_noise=args.label_noise)
    model = DigitsCNN(lr=args.lr, sam=run == "sam", sam_rho=args.rho)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[] if args.no_callbacks else landscape_callbacks(args.fast),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.fast,
        log_every_n_steps=5,
    )
    start = time.perf_counter()
    trainer.fit(model, train, val)
    measured = {"fit_seconds": time.perf_counter() - start, **fit_measures(model, train.dataset, val.dataset)}
    probe = tuple(t[: args.probe_size] for t in train.dataset.tensors)  # the same samples in every run
    measured.update(curvature(model, probe, args.rho, args.fast, args.seed))
    for cb in trainer.callbacks:
        measured.update(getattr(cb, "last_metrics", {}))
    return measured


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="sgd,sam", help="comma-separated, from sgd and sam (default: both)")
    parser.add_argument("--sam", action="store_true", help="short for --runs sam")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius, and the sharpness radius")
    parser.add_argument("--label-noise", type=float, default=0.2, help="share of training labels flipped")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01, help="both runs' learning rate (momentum 0.9)")
    parser.add_argument("--fast", action="store_true", help="256 samples, 1 epoch, small probes: a smoke test")
    parser.add_argument("--no-callbacks", action="store_true", help="train without the callbacks (for timing)")
    parser.add_argument("--logdir", default="lightning_logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-images", metavar="DIR", help="save the first run's logged images as PNGs")
    args = parser.parse_args(argv)
    runs = ["sam"] if args.sam else [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - {"sgd", "sam"} or len(set(runs)) < len(runs):
        parser.error(f"--runs takes sgd and/or sam, each once (got {args.runs!r})")
    args.n_train, args.probe_size = (256, 128) if args.fast else (1400, 512)
    if args.fast:
        args.epochs = 1

    results: dict[str, float] = {}
    version = None
    for run in runs:
        logger = pl.loggers.TensorBoardLogger(args.logdir, name="quickstart", version=version, sub_dir=run)
        version = logger.version  # every run of this call under one version_N, side by side
        results.update({f"{run}/{k}": float(v) for k, v in train_run(run, args, logger).items()})
        if run == runs[0]:
            first_log_dir = logger.log_dir

    setup = (
        f"{args.n_train} training digits, {args.label_noise:.0%} of their labels flipped, {args.epochs} epoch(s), "
        f"lr {args.lr}, seed {args.seed}, callbacks {'off' if args.no_callbacks else 'on'}; curvature on the first "
        f"{args.probe_size} training samples, ρ={args.rho}"
    )
    print(f"\n{setup}\n{'':<36}" + "".join(f"{run.upper():>10}" for run in runs))
    for key, label, fmt in ROWS:
        print(f"{label:<36}" + "".join(f"{results[f'{run}/{key}']:>10{fmt}}" for run in runs))
    if len(runs) > 1:
        print(f"\nReading ({runs[0].upper()} vs {runs[1].upper()}):")
        print("\n".join(reading(results, runs, args.probe_size, args.label_noise)))
    if not args.no_callbacks:
        print(
            "\nThe callbacks' curves in TensorBoard are measured on their own probe (the first batches of the fit, the "
            "same in every run), so their last values differ from this table's."
        )
    print(f"See the pictures:  tensorboard --logdir {args.logdir}")
    if args.export_images:  # the last frame of each image tag, bytes unchanged (docs/tensorboard_*.png)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _tensorboard_images import export_images

        for path in export_images(first_log_dir, args.export_images):
            print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
