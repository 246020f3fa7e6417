"""Small-data device modelling: an MLP fit of a transistor's drain current, plain optimizer vs SAM.

The case our users live in: a few dozen measured bias points of one device, a smooth neural model that
must interpolate between them. Here the "measurements" come from a textbook compact model, the long-channel
EKV model of an n-channel MOSFET (Enz, Krummenacher, Vittoz 1995) with channel-length modulation, source
and bulk grounded, which covers weak, moderate and strong inversion with one expression:

    V_P  = (V_GS − V_T0) / n                              pinch-off voltage
    i_f  = ln²(1 + exp(V_P / (2 U_T)))                     forward normalized current
    i_r  = ln²(1 + exp((V_P − V_DS) / (2 U_T)))            reverse normalized current
    I_S  = 2 n β U_T²,   β = KP · W / L                    specific current
    I_D  = I_S · (i_f − i_r) · (1 + λ V_DS)

with V_T0 = 0.45 V, n = 1.35, U_T = kT/q = 25.85 mV (300 K), KP = 200 µA/V², W/L = 5 (β = 1 mA/V²,
I_S ≈ 1.8 µA) and λ = 0.08 V⁻¹, over V_GS ∈ [0, 1.2] V and V_DS ∈ [0.05, 1.2] V: the current spans
almost eight decades (≈ 4 pA to ≈ 0.23 mA). Measurement noise is multiplicative, I_meas = I_D · exp(σ·z),
z ~ N(0, 1), σ = 0.05 (5 %, i.e. 0.022 decades of log10 I_D), drawn from ``--seed``.

As a device engineer would, the network fits ``log10(I_D / 1 A)``, standardized with the training
points' mean and standard deviation (so the loss is a mean squared error in units of that spread, and
sub-threshold and saturation points weigh alike), from the bias voltages scaled to [−1, 1]. Training
set: ``--n-train`` (40) bias points drawn uniformly in the box; test set: a 20 × 20 grid of bias points
(400), with their own noise. An MLP (2 → 64 → 64 → 1, SiLU: smooth, as circuit simulation needs
derivatives) is trained with Adam from the same initial weights and the same mini-batch order, plainly
and with ``SAMMixin``'s flag (``sam=True``) at each radius ``sam_rho`` in ``--rho`` (0.01 and 0.05 by
default); ``--seeds`` initializations (the data stay the same). Then, per run:

- train and test loss and the generalization gap (test − train), in the standardized units;
- the RMS error of ``log10 I_D`` against the noise-free model on the test grid, in decades, and the
  matching typical relative current error ``10^RMS − 1``;
- worst-case ℓ2 sharpness (plain, ``ρ = 0.05``, and adaptive, ``ρ = 0.5``), average-case ℓ2 sharpness and
  the top Hessian eigenvalue of the training loss, all on the whole training set;

printed per seed and as means over seeds. A figure of the first seed's fits goes to
``<out>/device_modeling.png``: transfer curves I_D–V_GS (log scale) and output curves I_D–V_DS (linear
scale) over the noise-free model. Run it:

    python examples/device_modeling.py                  # a few minutes on a laptop CPU
    python examples/device_modeling.py --fast           # well under a minute (the CI smoke test)
    python examples/device_modeling.py --rho 0.002 0.01 --seeds 5

The example states no expected outcome here: what it measured on our machine is in the README.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from _report import report_seeds
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import SAMMixin
from lightning_landscape import functional as LF

# EKV parameters (see the module docstring)
VT0, N_SLOPE, UT, KP, W_OVER_L, LAMBDA = 0.45, 1.35, 0.02585, 200e-6, 5.0, 0.08
VGS_RANGE, VDS_RANGE = (0.0, 1.2), (0.05, 1.2)
NOISE = 0.05


def ekv_drain_current(vgs: Tensor, vds: Tensor) -> Tensor:
    """Drain current (A) of the long-channel EKV model with channel-length modulation (float64).

    Example:
        >>> i = ekv_drain_current(torch.tensor([0.0, 1.2], dtype=torch.float64), torch.tensor([1.0, 1.0]))
        >>> bool(i[0] < 1e-10 < 1e-4 < i[1])
        True
    """
    vgs, vds = vgs.double(), vds.double()
    vp = (vgs - VT0) / N_SLOPE
    i_f = nn.functional.softplus(vp / (2 * UT)).pow(2)  # softplus(x) = ln(1 + e^x), stable for large x
    i_r = nn.functional.softplus((vp - vds) / (2 * UT)).pow(2)
    i_s = 2 * N_SLOPE * KP * W_OVER_L * UT**2
    return i_s * (i_f - i_r) * (1 + LAMBDA * vds)


def _scale(v: Tensor, lo_hi: tuple[float, float]) -> Tensor:
    lo, hi = lo_hi
    return (2 * (v - lo) / (hi - lo) - 1).float()


def make_data(n_train: int, grid: int, seed: int) -> dict[str, Tensor]:
    """Noisy training points (uniform in the bias box), a noisy test grid, and the noise-free truth on it."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([VGS_RANGE[0], VDS_RANGE[0]], dtype=torch.float64)
    hi = torch.tensor([VGS_RANGE[1], VDS_RANGE[1]], dtype=torch.float64)
    bias_train = lo + (hi - lo) * torch.rand(n_train, 2, generator=g, dtype=torch.float64)
    vgs, vds = torch.meshgrid(
        torch.linspace(*VGS_RANGE, grid, dtype=torch.float64),
        torch.linspace(*VDS_RANGE, grid, dtype=torch.float64),
        indexing="ij",
    )
    bias_test = torch.stack([vgs.reshape(-1), vds.reshape(-1)], dim=1)

    def measure(bias: Tensor) -> tuple[Tensor, Tensor]:
        true = ekv_drain_current(bias[:, 0], bias[:, 1])
        noisy = true * torch.exp(NOISE * torch.randn(len(bias), generator=g, dtype=torch.float64))
        return torch.log10(true), torch.log10(noisy)

    _, log_train = measure(bias_train)
    log_true_test, log_test = measure(bias_test)
    mean, std = log_train.mean(), log_train.std()

    def inputs(bias: Tensor) -> Tensor:
        return torch.stack([_scale(bias[:, 0], VGS_RANGE), _scale(bias[:, 1], VDS_RANGE)], dim=1)

    return {
        "bias_train": bias_train,
        "x_train": inputs(bias_train),
        "y_train": ((log_train - mean) / std).float().unsqueeze(1),
        "x_test": inputs(bias_test),
        "y_test": ((log_test - mean) / std).float().unsqueeze(1),
        "log_true_test": log_true_test,
        "bias_test": bias_test,
        "mean": mean,
        "std": std,
    }


class DeviceMLP(SAMMixin, pl.LightningModule):
    """2 → hidden → hidden → 1 SiLU MLP on standardized log-current; SAM settings pass through ``**kwargs``."""

    def __init__(self, hidden: int = 64, lr: float = 1e-2, epochs: int = 40, **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.epochs)]


def mse(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The loss protocol of ``lightning_landscape.functional``: ``loss_fn(model, batch) -> scalar``."""
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def curves_figure(data: dict[str, Tensor], models: dict[str, nn.Module]) -> Figure:
    """Per model: transfer curves I_D–V_GS (log scale) and output curves I_D–V_DS (linear scale), the fit
    (solid) over the noise-free EKV model (dashed)."""
    fig = Figure(figsize=(10, 3.3 * len(models)), dpi=72)
    sweeps = (
        ("V_GS", VGS_RANGE, "V_DS", (0.1, 0.6, 1.2), True),  # transfer characteristics, log current
        ("V_DS", VDS_RANGE, "V_GS", (0.6, 0.9, 1.2), False),  # output characteristics, linear current
    )
    colors = ("tab:blue", "tab:orange", "tab:green")
    for row, (name, model) in enumerate(models.items()):
        for col, (swept, swept_range, fixed, fixed_values, log) in enumerate(sweeps):
            ax = fig.add_subplot(len(models), 2, 2 * row + col + 1)
            v = torch.linspace(*swept_range, 121, dtype=torch.float64)
            for value, color in zip(fixed_values, colors, strict=True):
                other = torch.full_like(v, value)
                vgs, vds = (v, other) if swept == "V_GS" else (other, v)
                x = torch.stack([_scale(vgs, VGS_RANGE), _scale(vds, VDS_RANGE)], dim=1)
                with torch.no_grad():
                    fit = 10 ** (model(x).double().squeeze(1) * data["std"] + data["mean"])
                true = ekv_drain_current(vgs, vds)
                scale = 1.0 if log else 1e3  # mA on the linear axes
                plot = ax.semilogy if log else ax.plot
                plot(v.numpy(), (true * scale).numpy(), color=color, lw=1, ls="--")
                plot(v.numpy(), (fit * scale).numpy(), color=color, lw=1.5, label=f"{fixed} = {value} V")
            ax.set_xlabel(f"{swept} (V)")
            ax.set_ylabel("I_D (A)" if log else "I_D (mA)")
            ax.set_title(f"{name}: fit (solid), EKV (dashed)", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="x-small", loc="lower right" if log else "upper left")
    fig.tight_layout()
    return fig


def run(data: dict[str, Tensor], rho: float | None, seed: int, args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """Train one model from ``seed``, plainly (``rho=None``) or with SAM at radius ``rho``, and measure it."""
    pl.seed_everything(seed, verbose=False)  # same initial weights and batch order with and without SAM
    sam = {} if rho is None else {"sam": True, "sam_rho": rho}
    model = DeviceMLP(hidden=args.hidden, lr=args.lr, epochs=args.epochs, **sam)
    # one epoch = `repeats` shuffled passes over the few training points (fewer epochs, less loop overhead)
    x, y = data["x_train"], data["y_train"]
    loader = DataLoader(TensorDataset(x.repeat(args.repeats, 1), y.repeat(args.repeats, 1)),
                        batch_size=args.batch_size, shuffle=True)  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    model.eval()
    train = [(x, y)]
    with torch.no_grad():
        train_loss = float(mse(model, (x, y)))
        test_loss = float(mse(model, (data["x_test"], data["y_test"])))
        log_pred = model(data["x_test"]).double().squeeze(1) * data["std"] + data["mean"]
    rms_dec = float((log_pred - data["log_true_test"]).pow(2).mean().sqrt())
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    metrics = {
        "train loss (MSE, std. units)": train_loss,
        "test loss (MSE, std. units)": test_loss,
        "gap (test − train)": test_loss - train_loss,
        "RMS error vs truth (decades)": rms_dec,
        "  as relative current error %": 100 * (10**rms_dec - 1),
        "worst-case l2 sharpness ρ=.05": LF.sharpness(model, mse, train, rho=0.05, generator=gen),
        "worst-case l2 adaptive ρ=.5": LF.sharpness(model, mse, train, rho=0.5, adaptive=True, generator=gen),
        "average-case l2 ρ=.05": LF.sharpness(model, mse, train, rho=0.05, kind="average_case", generator=gen),
        "top Hessian eigenvalue": float(LF.hessian_eigenvalues(model, mse, train, generator=gen).eigenvalues[0]),
        "weight norm": float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()),
        "seconds: training": seconds,
    }
    metrics["seconds: measurements"] = time.perf_counter() - start
    return model, metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=40, help="training bias points")
    parser.add_argument("--grid", type=int, default=20, help="test grid points per axis")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (cosine-annealed)")
    parser.add_argument("--rho", type=float, nargs="+", default=[0.01, 0.05], help="SAM radii to compare")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=25, help="passes over the training points per epoch")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3, help="initializations (the data is the same)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data (bias points and noise)")
    parser.add_argument(
        "--out", default="example_figures", help="folder for device_modeling.png (--out docs regenerates README's)"
    )
    parser.add_argument("--fast", action="store_true", help="small and short: a smoke test")
    args = parser.parse_args(argv)
    if args.fast:
        args.epochs, args.repeats, args.seeds, args.grid = 3, 5, 1, 10

    data = make_data(args.n_train, args.grid, args.seed)
    cases: dict[str, float | None] = {"plain (Adam)": None, **{f"SAM (ρ={r:g})": r for r in args.rho}}
    per_seed: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    last_models: dict[str, nn.Module] = {}
    for seed in range(args.seeds):
        for name, rho in cases.items():
            model, metrics = run(data, rho, seed, args)
            per_seed[name].append(metrics)
            if seed == 0:
                last_models[name] = model

    columns = list(cases)
    steps = args.epochs * math.ceil(args.n_train * args.repeats / args.batch_size)
    setup = (
        f"{args.n_train} training bias points, {args.grid}x{args.grid} test grid, MLP 2-{args.hidden}-"
        f"{args.hidden}-1, {steps} Adam steps of batch {args.batch_size}"
    )
    means = report_seeds(
        per_seed, columns, setup, columns[1:], "SAM's value is lower than plain's", lambda v, ref: v < ref
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "device_modeling.png"
    FigureCanvasAgg(curves_figure(data, last_models)).print_png(str(path))
    print(f"\nFigure: {path}")
    return {f"{c}/{k}": v for c in columns for k, v in means[c].items()}


if __name__ == "__main__":
    main()
