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
