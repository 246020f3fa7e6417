"""Skip connections and the loss landscape: Li et al. (2018)'s ResNet-56 with/without shortcuts, scaled down.

Li et al. ("Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018, Fig. 5) show that a deep CNN
without shortcut connections has a chaotic, sharply rising loss surface while the same network with them
has a smooth, nearly convex basin. This example repeats the experiment at laptop scale on scikit-learn's
digits (1x8x8 images, bundled, no download): one ResNet-style CNN, a 3x3 stem and ``--blocks`` residual
blocks of two 3x3 conv + BatchNorm layers each (``2·blocks + 1`` conv layers and a linear head; 17 + 1
at the default 8 blocks), trained with and without the shortcuts from the *same* initial weights and
batch order (the shortcuts add no parameters), for each of ``--seeds`` seeds. Then, for each trained
network, with ``lightning_landscape.functional``:

- a 2D loss slice on the same fixed probe set of training images (``loss_surface``, filter-normalized
  random directions from ``random_directions`` with the same seed for both networks), drawn side by side
  with one shared colour scale (seed 0) and saved as ``<out>/skip_connections.png``;
- the top Hessian eigenvalue (``hessian_eigenvalues``, Lanczos) and the most negative one (the top
  eigenvalue of the Hessian of the negated loss) at the trained weights, on the same probe set;
- training and validation loss and accuracy (whole sets, eval mode);
- where the curvature lives: the top eigenvalue of each block's Hessian (the stem, every residual block, the
  head; ``block_curvature``) on the same probe at the trained weights, and for seed 0 the same per block along
  training (``HessianCallback(blocks=...)`` every epoch), drawn as the callback's ``hessian/blocks`` heatmap side
  by side for both networks in ``<out>/skip_connections_blocks.png``.

Scalars of the slice: ``rise_at_edge`` (mean loss on the grid's outer ring minus the loss at the centre)
and the fraction of the grid below ``ln 10`` (the loss of a uniform guess over the ten classes), a crude
width of the basin in the slice; and, read off the grid too, the fraction of interior grid points where the
slice's own curvature (finite differences) is not convex, and the number of local minima in it (Li et
al. describe the surfaces without shortcuts as chaotic and non-convex).

Everything is printed as a table per seed, then as means over seeds with the number of seeds in which
the network without shortcuts has the higher value. Run it:

    python examples/skip_connections.py                 # a few minutes on a laptop CPU
    python examples/skip_connections.py --fast          # well under a minute (the CI smoke test)
    python examples/skip_connections.py --out /tmp/figs --blocks 12 --epochs 12 --seeds 5

The example states no expected outcome here: what it measured on our machine is in the README.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report_seeds
from quickstart import digits_loaders

from lightning_landscape import HessianCallback
from lightning_landscape import functional as LF
from lightning_landscape.plotting import blocks_norm, draw_blocks_heatmap


class Block(nn.Module):
    """Two 3x3 conv + BatchNorm layers; with ``skip`` the input is added before the last ReLU."""

    def __init__(self, width: int, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + x if self.skip else out)


class DigitsResNet(pl.LightningModule):
    """A ResNet-style CNN for 1x8x8 digits: stem, ``blocks`` residual blocks, global pooling, linear head.

    SGD with momentum and a cosine learning-rate schedule over ``epochs``.
    """

    def __init__(
        self,
        blocks: int = 8,
        width: int = 12,
        skip: bool = True,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        epochs: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            *[Block(width, skip) for _ in range(blocks)],
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=h.epochs)]


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The loss protocol of ``lightning_landscape.functional``: ``loss_fn(model, batch) -> scalar``."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def cross_entropy_net(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The same loss for the bare network (``DigitsResNet.net``)."""
    x, y = batch
    return nn.functional.cross_entropy(net(x), y)


def negated_cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Its top Hessian eigenvalue is minus the most negative eigenvalue of the loss's Hessian."""
    return -cross_entropy(model, batch)


def slice_shape(surface: LF.SurfaceResult) -> tuple[float, int]:
    """How irregular a 2D slice is, from its grid alone: the fraction of interior grid points where the
    slice's own 2x2 curvature (central finite differences) has a negative eigenvalue, and the number of
    strict local minima (interior points below all eight neighbours).

    Example:
        >>> c = torch.linspace(-1, 1, 5, dtype=torch.float64)
        >>> bowl = LF.SurfaceResult(c, c[:, None] ** 2 + c[None, :] ** 2, torch.zeros(2, 1))
        >>> slice_shape(bowl)
        (0.0, 1)
    """
    f = surface.losses
    faa = f[2:, 1:-1] - 2 * f[1:-1, 1:-1] + f[:-2, 1:-1]  # curvatures times h² (the sign is what counts)
    fbb = f[1:-1, 2:] - 2 * f[1:-1, 1:-1] + f[1:-1, :-2]
    fab = (f[2:, 2:] - f[2:, :-2] - f[:-2, 2:] + f[:-2, :-2]) / 4
    nonconvex = (faa + fbb < 0) | (faa * fbb - fab**2 < 0)
    centre = f[1:-1, 1:-1]
    neighbours = [f[1 + di : f.shape[0] - 1 + di, 1 + dj : f.shape[1] - 1 + dj]
                  for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]  # fmt: skip
    minima = torch.stack([centre < n for n in neighbours]).all(dim=0)
    return float(nonconvex.double().mean()), int(minima.sum())


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``(x, y)`` in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def side_by_side_figure(results: dict[str, LF.SurfaceResult], eigen: dict[str, float]) -> Figure:
    """Contour maps (top) and 3D surfaces (bottom) of the slices, one shared logarithmic colour scale."""
    fig = Figure(figsize=(11, 8.4), dpi=80)
    finite = np.concatenate([r.losses[r.losses.isfinite()].numpy() for r in results.values()])
    vmin, vmax = float(finite.min()), float(finite.max())
    vmax = max(vmax, vmin * (1 + 1e-6))
    norm = LogNorm(vmin, vmax)
    edges = np.geomspace(vmin, vmax, 25)
    contour = None
    for col, (name, res) in enumerate(results.items()):
        c = res.coords.numpy()
        z = np.ma.masked_invalid(res.losses.numpy().T)  # rows follow the vertical axis (η)
        a, b = np.meshgrid(c, c)
        ax = fig.add_subplot(2, 2, col + 1)
        contour = ax.contourf(a, b, z, levels=edges, norm=norm, cmap="viridis")
        ax.contour(a, b, z, levels=edges[::3], colors="white", linewidths=0.4, alpha=0.6)
        ax.plot([0.0], [0.0], marker="x", color="red", markersize=8)
        ax.set_aspect("equal")
        ax.set_xlabel("direction 1 (δ)")
        ax.set_ylabel("direction 2 (η)")
        ax.set_title(f"{name}\nλ_max = {eigen[name]:.3g}, rise at edge = {res.rise_at_edge():.3g}", fontsize=10)
        ax3d = fig.add_subplot(2, 2, col + 3, projection="3d")
        ax3d.plot_surface(
            a, b, np.ma.log10(z), cmap="viridis", norm=Normalize(math.log10(vmin), math.log10(vmax)), linewidth=0
        )
        ax3d.set_zlim(math.log10(vmin), math.log10(vmax))
        ax3d.set_xlabel("δ")
        ax3d.set_ylabel("η")
        ax3d.set_zlabel("log10 loss")
    if contour is not None:
        fig.colorbar(contour, ax=fig.axes[0::2][:2], ticks=np.geomspace(vmin, vmax, 5), format="%.3g",
                     label="training loss (log scale)", shrink=0.9)  # fmt: skip
    fig.suptitle("Loss surface around the trained weights (same filter-normalized directions)")
    return fig


def network_blocks(blocks: int) -> dict[str, list[str]]:
    """The network's parts as blocks for the per-block curvature: the stem (conv + BatchNorm), each residual
    block, the head (names relative to ``DigitsResNet.net``)."""
    parts = {"stem": ["0.*", "1.*"]}
    parts.update({f"block {i + 1}": [f"{i + 3}.*"] for i in range(blocks)})
    parts["head"] = [f"{blocks + 5}.*"]
    return parts


def blocks_figure(watched: dict[str, HessianCallback]) -> Figure:
    """The callbacks' ``hessian/blocks`` heatmaps (top eigenvalue per block along training) side by side, on one
    shared colour scale."""
    histories = {name: cb.block_history for name, cb in watched.items()}
    arrays = {name: np.array(list(h["eigenvalues"].values())) for name, h in histories.items()}
    norm = blocks_norm(*arrays.values())
    fig = Figure(figsize=(11, 4.2), dpi=80, layout="constrained")
    image = None
    for i, (name, history) in enumerate(histories.items()):
        ax = fig.add_subplot(1, len(histories), i + 1)
        names = list(history["eigenvalues"])
        image = draw_blocks_heatmap(ax, names, history["steps"], arrays[name], f"{name}", norm=norm)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, label="top eigenvalue of the block's Hessian (log scale)", shrink=0.9)
    fig.suptitle("Which block is sharp when: HessianCallback(blocks=...)'s hessian/blocks, seed 0")
    return fig


def run_case(
    skip: bool, seed: int, args: argparse.Namespace, data: dict[str, Tensor]
) -> tuple[LF.SurfaceResult, dict[str, float], HessianCallback | None]:
    """Train the network with or without shortcuts from ``seed``, then slice and measure it."""
    pl.seed_everything(seed, verbose=False)  # the same initial weights with and without shortcuts
    model = DigitsResNet(blocks=args.blocks, width=args.width, skip=skip, epochs=args.epochs)
    x_train, y_train, x_val, y_val = data["x_train"], data["y_train"], data["x_val"], data["y_val"]
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))  # same batch order too  # fmt: skip
    probe = [(x_train[: args.probe], y_train[: args.probe])]  # fixed: the same images for every network
    parts = network_blocks(args.blocks)
    # seed 0: the per-block top eigenvalue along training, every epoch (its hessian/blocks heatmap)
    watch = HessianCallback(every_n_epochs=1, blocks=parts, num_samples=args.probe) if seed == 0 else None
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[watch] if watch is not None else [],
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    train_seconds = time.perf_counter() - start - (watch._fixed_spent if watch is not None else 0.0)

    start = time.perf_counter()
    dirs = LF.random_directions(model, torch.Generator().manual_seed(seed), count=2)  # same raw directions
    surface = LF.loss_surface(model, cross_entropy, probe, steps=args.steps, distance=args.distance, directions=dirs)
    slice_seconds = time.perf_counter() - start
    start = time.perf_counter()
    top = LF.hessian_eigenvalues(model, cross_entropy, probe, k=1, generator=torch.Generator().manual_seed(1))
    bottom = LF.hessian_eigenvalues(
        model, negated_cross_entropy, probe, k=1, max_hvps=60, generator=torch.Generator().manual_seed(2)
    )
    hessian_seconds = time.perf_counter() - start
    start = time.perf_counter()
    per_block = LF.block_curvature(model.net, cross_entropy_net, probe, parts, trace=False,
                                   generator=torch.Generator().manual_seed(3))  # fmt: skip
    block_seconds = time.perf_counter() - start

    train_loss, train_acc = evaluate(model, x_train, y_train)
    val_loss, val_acc = evaluate(model, x_val, y_val)
    finite = surface.losses[surface.losses.isfinite()]
    nonconvex, minima = slice_shape(surface)
    return (
        surface,
        {
            "train loss": train_loss,
            "train accuracy": train_acc,
            "val loss": val_loss,
            "val accuracy": val_acc,
            "gap (val - train loss)": val_loss - train_loss,
            "top eigenvalue": float(top.eigenvalues[0]),
            "most negative eigenvalue": -float(bottom.eigenvalues[0]),
            "|λ_min / λ_max|": abs(float(bottom.eigenvalues[0]) / float(top.eigenvalues[0])),
            "eigen HVPs (top + bottom)": float(top.num_hvps + bottom.num_hvps),
            "probe loss at centre": surface.center_loss,
            "rise_at_edge": surface.rise_at_edge(),
            "max loss on grid": float(finite.max()) if finite.numel() else math.nan,
            "grid fraction below ln 10": float((surface.losses < math.log(10)).double().mean()),
            "non-convex fraction of slice": nonconvex,
            "local minima in slice": float(minima),
            "nonfinite fraction": surface.nonfinite_fraction,
            **{f"λ_max of {name}": value for name, value in per_block.eigenvalues.items()},
            "seconds: training": train_seconds,
            "seconds: 2D slice": slice_seconds,
            "seconds: eigenvalues": hessian_seconds,
            "seconds: per-block eigenvalues": block_seconds,
        },
        watch,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8, help="residual blocks (2 conv layers each)")
    parser.add_argument("--width", type=int, default=12, help="channels of every conv layer")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=21, help="grid points per axis of the 2D slice (odd)")
    parser.add_argument("--distance", type=float, default=1.0, help="half-width of the slice")
    parser.add_argument("--probe", type=int, default=256, help="training images in the probe set")
    parser.add_argument(
        "--out", default="example_figures", help="folder for skip_connections.png (--out docs regenerates README's)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="initializations and batch orders (seed 0 is drawn)")
    parser.add_argument("--fast", action="store_true", help="small and short: a smoke test")
    args = parser.parse_args(argv)
    if args.fast:
        args.blocks, args.epochs, args.steps, args.probe, args.seeds = min(args.blocks, 4), 2, 7, 64, 1
    n_train = 512 if args.fast else 1400

    train, val = digits_loaders(n_train, batch_size=64, seed=0)  # the same split for every seed
    data = {"x_train": train.dataset.tensors[0], "y_train": train.dataset.tensors[1],
            "x_val": val.dataset.tensors[0], "y_val": val.dataset.tensors[1]}  # fmt: skip

    columns = ["with skips", "without skips"]
    per_seed: dict[str, list[dict[str, float]]] = {c: [] for c in columns}
    surfaces: dict[str, LF.SurfaceResult] = {}
    watched: dict[str, HessianCallback] = {}
    for seed in range(args.seeds):
        for name, skip in zip(columns, (True, False), strict=True):
            surface, metrics, watch = run_case(skip, seed, args, data)
            per_seed[name].append(metrics)
            if seed == 0:
                surfaces[name], watched[name] = surface, watch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = side_by_side_figure(surfaces, {c: per_seed[c][0]["top eigenvalue"] for c in columns})
    path = out / "skip_connections.png"
    FigureCanvasAgg(fig).print_png(str(path))
    blocks_path = out / "skip_connections_blocks.png"
    FigureCanvasAgg(blocks_figure(watched)).print_png(str(blocks_path))

    setup = (
        f"{2 * args.blocks + 1} conv layers, width {args.width}, {args.epochs} epochs, {n_train} training images; "
        f"slice {args.steps}x{args.steps} on {args.probe} of them, distance {args.distance}"
    )
    means = report_seeds(
        per_seed, columns, setup, [columns[1]], "the value without skips is higher", lambda v, ref: v > ref
    )
    print(f"\nFigures (seed 0): {path}, {blocks_path}")
    return {f"{c}/{k}": v for c in columns for k, v in means[c].items()}


if __name__ == "__main__":
    main()
