"""Matplotlib figures for the callbacks, built without pyplot (no global backend state)."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["figure_to_array", "spectral_density_figure"]


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an ``[H, W, 3]`` uint8 RGB array.

    Example:
        >>> fig = Figure(figsize=(2, 1), dpi=50)
        >>> figure_to_array(fig).shape
        (50, 100, 3)
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def spectral_density_figure(grid: Tensor, density: Tensor, title: str = "Hessian spectral density") -> Figure:
    """Log-scale density over eigenvalue, as PyHessian and Ghorbani et al. (2019) draw it.

    Example:
        >>> import torch
        >>> g = torch.linspace(-1, 1, 50)
        >>> fig = spectral_density_figure(g, torch.exp(-g**2))
        >>> fig.axes[0].get_yscale()
        'log'
    """
    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.add_subplot()
    x = grid.detach().double().cpu().numpy()
    y = density.detach().double().cpu().numpy()
    floor = max(float(y.max()) * 1e-8, 1e-300) if y.size and np.isfinite(y).any() else 1e-300
    ax.semilogy(x, np.clip(y, floor, None), color="tab:blue", lw=1.2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- loss slices
__all__ += ["line_figure", "surface_figure"]


def _finite_range(values: np.ndarray) -> tuple[float, float, bool] | None:
    """``(vmin, vmax, log)`` of the finite values (``log`` when all are > 0), or ``None`` if there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    vmin, vmax = float(finite.min()), float(finite.max())
    log = vmin > 0
    if vmax <= vmin:  # a flat slice still needs a colour range
        vmax = vmin * (1 + 1e-6) if log else vmin + max(abs(vmin) * 1e-6, 1e-12)
    return vmin, vmax, log


def surface_figure(coords: Tensor, losses: Tensor, title: str = "Loss surface", levels: int = 20) -> Figure:
    """A 2D loss slice as a filled contour map and a 3D surface side by side (Li et al. 2018).

    ``losses[i, j]`` is the loss at ``θ + coords[i]·δ + coords[j]·η`` (as
    :func:`~lightning_landscape.functional.surface.loss_surface` returns it): ``δ`` runs along the
    horizontal axis. Colour (and the 3D height) is on a log scale when every finite loss is positive,
    linear otherwise; non-finite points are masked (left blank), never drawn as values. ``θ`` is marked.

    Example:
        >>> import torch
        >>> c = torch.linspace(-1, 1, 5)
        >>> z = 1 + c[:, None] ** 2 + c[None, :] ** 2
        >>> z[0, 0] = float("nan")
        >>> fig = surface_figure(c, z)
        >>> len(fig.axes)                      # contour, its colour bar, 3D surface
        3
    """
    from matplotlib.colors import LogNorm, Normalize

    fig = Figure(figsize=(10, 4.2), dpi=100)
    c = coords.detach().double().cpu().numpy()
    z = losses.detach().double().cpu().numpy().T  # rows follow the vertical axis (η)
    a, b = np.meshgrid(c, c)
    masked = np.ma.masked_invalid(z)
    ax = fig.add_subplot(1, 2, 1)
    ax3d = fig.add_subplot(1, 2, 2, projection="3d")
    rng = _finite_range(z)
    if rng is None:
        ax.text(0.5, 0.5, "no finite loss on the grid", ha="center", va="center", transform=ax.transAxes)
    else:
        vmin, vmax, log = rng
        if log:
            norm, edges = LogNorm(vmin, vmax), np.geomspace(vmin, vmax, levels + 1)
            height, zlabel = np.ma.log10(masked), "log10 loss"
        else:
            norm, edges = Normalize(vmin, vmax), np.linspace(vmin, vmax, levels + 1)
            height, zlabel = masked, "loss"
        cs = ax.contourf(a, b, masked, levels=edges, norm=norm, cmap="viridis", extend="neither")
        ax.contour(a, b, masked, levels=edges[::4], colors="white", linewidths=0.4, alpha=0.6)
        ticks = np.geomspace(vmin, vmax, 5) if log else np.linspace(vmin, vmax, 5)
        fig.colorbar(cs, ax=ax, ticks=ticks, format="%.3g", label="loss" + (" (log scale)" if log else ""))
        hmin, hmax = float(height.min()), float(height.max())
        ax3d.plot_surface(
            a, b, height, cmap="viridis", norm=Normalize(hmin, hmax if hmax > hmin else hmin + 1e-12), linewidth=0
        )
        ax3d.set_zlabel(zlabel)
    ax.plot([0.0], [0.0], marker="x", color="red", markersize=8, label="θ")
    ax.set_xlabel("direction 1 (δ)")
    ax.set_ylabel("direction 2 (η)")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize="small")
    ax3d.set_xlabel("δ")
    ax3d.set_ylabel("η")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.09, right=0.95, bottom=0.14, top=0.88, wspace=0.3)
    return fig


def line_figure(
    coords: Tensor,
    train_losses: Tensor,
    val_losses: Tensor | None = None,
    title: str = "Loss along a direction",
) -> Figure:
    """A 1D loss slice, training loss and (optionally) validation loss on the same axes.

    The minimum of each curve is marked, so the shift between train and validation minima, and what it
    costs, is visible (Keskar et al. 2017; Li et al. 2018). Log-scale losses when every finite value is
    positive; non-finite points leave gaps.

    Example:
        >>> import torch
        >>> a = torch.linspace(-1, 1, 21)
        >>> fig = line_figure(a, 1 + a**2, 1.2 + (a - 0.2) ** 2)
        >>> [line.get_label() for line in fig.axes[0].get_lines()][:2]
        ['train', 'validation']
    """
    fig = Figure(figsize=(5, 3.4), dpi=100)
    ax = fig.add_subplot()
    x = coords.detach().double().cpu().numpy()
    curves = [("train", train_losses, "tab:blue")]
    if val_losses is not None:
        curves.append(("validation", val_losses, "tab:orange"))
    arrays = [(label, losses.detach().double().cpu().numpy(), color) for label, losses, color in curves]
    for label, y, color in arrays:
        ax.plot(x, np.where(np.isfinite(y), y, np.nan), color=color, lw=1.5, label=label)
    for _, y, color in arrays:
        if np.isfinite(y).any():
            i = int(np.nanargmin(np.where(np.isfinite(y), y, np.nan)))
            ax.plot([x[i]], [y[i]], marker="o", color=color, markersize=4)
    rng = _finite_range(np.concatenate([y for _, y, _ in arrays]))
    if rng is not None and rng[2]:
        ax.set_yscale("log")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("step along the direction (θ at 0)")
    ax.set_ylabel("loss" + (" (log scale)" if rng is not None and rng[2] else ""))
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig
