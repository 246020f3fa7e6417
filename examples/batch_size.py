"""Small-batch vs large-batch training and the sharpness of the minima they find (Keskar et al. 2017).

Keskar et al. ("On Large-Batch Training for Deep Learning: Generalization Gap and Sharp Minima", ICLR
2017) report that large-batch training converges to sharper minima that generalize worse. This example
repeats the comparison at laptop scale: one MLP (64 → 256 → 256 → 10, ReLU) on scikit-learn's digits
(bundled, no download; 1400 training images, 397 validation images), trained with Adam (lr 1e-3, as
Keskar et al. used Adam) at a small and at a large batch size (``--small``, ``--large``; 16 and 700 by
default) from the same initial weights, each until its loss on the whole training set falls below
``--target`` (1e-3) or ``--max-epochs`` pass. Then, per run, on the whole training set with
``lightning_landscape.functional``:

- worst-case ℓ2 sharpness at ``ρ = 0.05`` (``sharpness``, projected gradient ascent) and its adaptive form
  (``adaptive=True``, ``ρ = 0.5``, which rescaling the weights of a ReLU layer does not change);
- Keskar et al.'s ε-sharpness (``kind="keskar"``, ε = 1e-3: the largest loss increase in the box
  ``|δ_i| ≤ ε(|w_i| + 1)``, times ``100 / (1 + L)``);
- the top Hessian eigenvalue (``hessian_eigenvalues``);
- the generalization gap, validation minus training loss, and the accuracy gap.

Printed per seed and as means over ``--seeds`` initializations. A figure goes to ``<out>/batch_size.png``:
Keskar et al.'s Fig. 3, the loss along the straight line from the small-batch (α = 0) to the large-batch
(α = 1) weights, training and validation; and beside it a filter-normalized random 1D slice through each
(Li et al. 2018 show that without filter normalization such comparisons depend on the weights' scale).

    python examples/batch_size.py                  # a few minutes on a laptop CPU
    python examples/batch_size.py --fast           # well under a minute (the CI smoke test)
    python examples/batch_size.py --small 32 --large 1400 --seeds 5

The example states no expected outcome here: what it measured on our machine is in the README.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import EarlyStopping
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report_seeds
from quickstart import digits_loaders

from lightning_landscape import functional as LF


class DigitsMLP(pl.LightningModule):
    """64 → hidden → hidden → 10 ReLU MLP with Adam; logs its loss on the whole training set every epoch."""

    def __init__(self, hidden: int = 256, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 10))  # fmt: skip
        self.full_train: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_train_epoch_end(self) -> None:
        # the stopping criterion: the loss on the whole training set, the same for every batch size
        if self.full_train is not None:
            with torch.no_grad():
                self.log("full_train_loss", cross_entropy(self, self.full_train))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The loss protocol of ``lightning_landscape.functional``: ``loss_fn(model, batch) -> scalar``."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``(x, y)``."""
    logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def train_one(batch_size: int, seed: int, args: argparse.Namespace, data: dict) -> tuple[DigitsMLP, dict]:
    """Train from ``seed`` at ``batch_size`` until the target training loss, then measure."""
    pl.seed_everything(seed, verbose=False)  # same initial weights for both batch sizes
    model = DigitsMLP(hidden=args.hidden, lr=args.lr)
    model.full_train = (data["x_train"], data["y_train"])
    # the same training images for every run; the seed sets the initial weights and the batch order
    train = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
    stop = EarlyStopping(monitor="full_train_loss", stopping_threshold=args.target, patience=args.max_epochs,
                         check_on_train_epoch_end=True, mode="min", verbose=False)  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[stop],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    model.eval()

    probe = [(data["x_train"], data["y_train"])]  # measured on the whole training set
    train_loss, train_acc = evaluate(model, data["x_train"], data["y_train"])
    val_loss, val_acc = evaluate(model, data["x_val"], data["y_val"])
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    metrics = {
        "epochs": float(trainer.current_epoch),
        "optimizer steps": float(trainer.global_step),
        "train loss": train_loss,
        "val loss": val_loss,
        "gap (val − train loss)": val_loss - train_loss,
        "train accuracy": train_acc,
        "val accuracy": val_acc,
        "accuracy gap (train − val)": train_acc - val_acc,
        "worst-case l2 sharpness ρ=.05": LF.sharpness(model, cross_entropy, probe, rho=0.05, generator=gen),
        "worst-case l2 adaptive ρ=.5": LF.sharpness(model, cross_entropy, probe, rho=0.5, adaptive=True, generator=gen),
        "keskar sharpness ε=1e-3": LF.sharpness(model, cross_entropy, probe, rho=1e-3, kind="keskar", generator=gen),
        "top Hessian eigenvalue": float(
            LF.hessian_eigenvalues(model, cross_entropy, probe, generator=gen).eigenvalues[0]
        ),
        "weight norm": float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()),
        "seconds: training": seconds,
    }
    metrics["seconds: measurements"] = time.perf_counter() - start
    return model, metrics


def slices_figure(models: dict[str, nn.Module], data: dict, names: list[str]) -> Figure:
    """Left: loss on the line from the small-batch (α=0) to the large-batch (α=1) weights. Right: a
    filter-normalized random 1D slice through each (the same raw direction)."""
    train = [(data["x_train"], data["y_train"])]
    val = [(data["x_val"], data["y_val"])]
    small, large = models[names[0]], models[names[1]]
    spec_s, spec_l = LF.ParamSpec(small), LF.ParamSpec(large)
    direction = spec_l.parameter_vector() - spec_s.parameter_vector()
    fig = Figure(figsize=(10, 3.8), dpi=80)
    ax = fig.add_subplot(1, 2, 1)
    for label, batches, color in (("train", train, "tab:blue"), ("validation", val, "tab:orange")):
        line = LF.loss_line(small, cross_entropy, batches, steps=41, distance=2.0, direction=direction)
        keep = (line.coords >= -1.0) & (line.coords <= 2.0)
        ax.semilogy(line.coords[keep].numpy(), line.losses[keep].numpy(), color=color, label=label)
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"α  (0: {names[0]}, 1: {names[1]})")
    ax.set_ylabel("loss (log scale)")
    ax.set_title("Linear interpolation (Keskar et al. Fig. 3)", fontsize=10)
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    for (name, model), color in zip(models.items(), ("tab:green", "tab:red"), strict=True):
        d = LF.random_directions(model, torch.Generator().manual_seed(0), count=1)
        line = LF.loss_line(model, cross_entropy, train, steps=41, distance=1.0, direction=d)
        ax.semilogy(line.coords.numpy(), line.losses.numpy(), color=color, label=name)
    ax.set_xlabel("step along a filter-normalized random direction")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title("Random 1D slice (Li et al. 2018)", fontsize=10)
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=16, help="small batch size")
    parser.add_argument("--large", type=int, default=700, help="large batch size")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (both batch sizes)")
    parser.add_argument("--target", type=float, default=1e-3, help="stop at this loss on the whole training set")
    parser.add_argument("--max-epochs", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3, help="initializations")
    parser.add_argument(
        "--out", default="example_figures", help="folder for batch_size.png (--out docs regenerates README's)"
    )
    parser.add_argument("--fast", action="store_true", help="small and short: a smoke test")
    args = parser.parse_args(argv)
    args.n_train = 1400
    if args.fast:
        args.n_train, args.hidden, args.max_epochs, args.seeds, args.target = 256, 32, 3, 1, 1e-3
        args.large = min(args.large, 128)

    train, val = digits_loaders(args.n_train, batch_size=args.n_train, seed=0)
    data = {"x_train": train.dataset.tensors[0], "y_train": train.dataset.tensors[1],
            "x_val": val.dataset.tensors[0], "y_val": val.dataset.tensors[1]}  # fmt: skip
    columns = [f"batch {args.small}", f"batch {args.large}"]
    per_seed: dict[str, list[dict[str, float]]] = {c: [] for c in columns}
    first: dict[str, nn.Module] = {}
    for seed in range(args.seeds):
        for name, bs in zip(columns, (args.small, args.large), strict=True):
            model, metrics = train_one(bs, seed, args, data)
            per_seed[name].append(metrics)
            if seed == 0:
                first[name] = model

    setup = f"MLP 64-{args.hidden}-{args.hidden}-10, Adam lr {args.lr:g}, stop at train loss {args.target:g}"
    means = report_seeds(
        per_seed, columns, setup, [columns[1]], "the large batch's value is higher", lambda v, ref: v > ref
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "batch_size.png"
    FigureCanvasAgg(slices_figure(first, data, columns)).print_png(str(path))
    print(f"\nFigure: {path}")
    return {f"{c}/{k}": v for c in columns for k, v in means[c].items()}


if __name__ == "__main__":
    main()
