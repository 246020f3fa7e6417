"""Matplotlib figures for the callbacks, built without pyplot (no global backend state)."""

from __future__ import annotations

from typing import Any, NamedTuple

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


# ---------------------------------------------------------------------------------------------- trajectory plane
__all__ += ["SurfaceMesh", "surface_mesh", "trajectory_figure"]


class SurfaceMesh(NamedTuple):
    """A triangle mesh for TensorBoard's mesh plugin (``add_mesh``): ``[1, N, 3]`` float32 vertices, ``[1, N, 3]``
    uint8 colours, ``[1, F, 3]`` int32 faces."""

    vertices: np.ndarray
    colors: np.ndarray
    faces: np.ndarray


def trajectory_figure(
    x: Tensor,
    y: Tensor,
    losses: Tensor,
    path: Tensor,
    steps: list[int] | None = None,
    explained_variance: Tensor | None = None,
    title: str = "Optimizer trajectory",
    levels: int = 20,
) -> Figure:
    """The loss on the trajectory plane as contours, the path as a line of dots coloured by step (Li et al. 2018,
    §7), the weights (the origin) marked; each axis labelled with the share of the path's variance it explains.

    ``losses[i, j]`` is the loss at ``(x[i], y[j])`` (as
    :func:`~lightning_landscape.functional.trajectory.trajectory_surface` returns it); ``path`` is ``[n, 2]``.
    Log-scale colours when every finite loss is positive; non-finite points are masked.

    Example:
        >>> import torch
        >>> x, y = torch.linspace(-2, 1, 7), torch.linspace(-1, 1, 5)
        >>> z = 1 + x[:, None] ** 2 + y[None, :] ** 2
        >>> path = torch.tensor([[-1.5, 0.5], [-0.5, -0.2], [0.0, 0.0]])
        >>> fig = trajectory_figure(x, y, z, path, [0, 5, 10], torch.tensor([0.8, 0.15]))
        >>> fig.axes[0].get_xlabel()
        'direction 1 (80.0% of the path variance)'
    """
    from matplotlib.colors import LogNorm, Normalize

    fig = Figure(figsize=(6.2, 4.8), dpi=100)
    ax = fig.add_subplot()
    xs = x.detach().double().cpu().numpy()
    ys = y.detach().double().cpu().numpy()
    z = losses.detach().double().cpu().numpy().T  # rows follow the vertical axis
    masked = np.ma.masked_invalid(z)
    rng = _finite_range(z)
    if rng is None:
        ax.text(0.5, 0.5, "no finite loss on the grid", ha="center", va="center", transform=ax.transAxes)
    else:
        vmin, vmax, log = rng
        norm = LogNorm(vmin, vmax) if log else Normalize(vmin, vmax)
        edges = np.geomspace(vmin, vmax, levels + 1) if log else np.linspace(vmin, vmax, levels + 1)
        cs = ax.contourf(xs, ys, masked, levels=edges, norm=norm, cmap="viridis", alpha=0.9)
        ax.contour(xs, ys, masked, levels=edges[::2], colors="white", linewidths=0.4, alpha=0.6)
        ticks = np.geomspace(vmin, vmax, 5) if log else np.linspace(vmin, vmax, 5)
        fig.colorbar(cs, ax=ax, ticks=ticks, format="%.3g", label="loss" + (" (log scale)" if log else ""))
    p = path.detach().double().cpu().numpy()
    order = np.asarray(steps if steps is not None else range(len(p)), dtype=np.float64)
    ax.plot(p[:, 0], p[:, 1], color="white", lw=0.8, alpha=0.8)
    dots = ax.scatter(p[:, 0], p[:, 1], c=order, cmap="autumn", s=14, zorder=3, edgecolors="black", linewidths=0.3)
    fig.colorbar(dots, ax=ax, label="step", pad=0.02)
    ax.plot([0.0], [0.0], marker="x", color="red", markersize=9, mew=2, zorder=4, label="θ (now)")
    labels = []
    for k in range(2):
        share = "" if explained_variance is None else f" ({100 * float(explained_variance[k]):.1f}%"
        labels.append(f"direction {k + 1}{share and share + ' of the path variance)'}")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def surface_mesh(
    x: Tensor,
    y: Tensor,
    losses: Tensor,
    markers: list[tuple[float, float]] | None = None,
) -> SurfaceMesh:
    """A loss surface as a triangle mesh for TensorBoard's mesh plugin: a :class:`SurfaceMesh` ``(vertices, colors,
    faces)`` shaped ``[1, N, 3]`` (float32), ``[1, N, 3]`` (uint8) and ``[1, F, 3]`` (int32).

    The vertex at ``(x[i], y[j])`` has height ``log10 losses[i, j]`` (the loss itself when some finite loss is
    <= 0), rescaled so that the heights span half the wider horizontal extent (the vertical unit is arbitrary;
    the colour, viridis over the same scale, reads the loss). Grid cells with a non-finite corner are left out.
    Each of ``markers`` (default: the weights, ``(0, 0)``) is a small red pyramid standing on the surface.

    Example:
        >>> import torch
        >>> c = torch.linspace(-1, 1, 3)
        >>> v, col, f = surface_mesh(c, c, 1 + c[:, None] ** 2 + c[None, :] ** 2)
        >>> v.shape, col.dtype, f.shape          # 9 grid vertices + 4 of the marker; 8 triangles + 4
        ((1, 13, 3), dtype('uint8'), (1, 12, 3))
    """
    from matplotlib import colormaps

    xs = x.detach().double().cpu().numpy()
    ys = y.detach().double().cpu().numpy()
    z = losses.detach().double().cpu().numpy()
    finite = np.isfinite(z)
    rng = _finite_range(z)
    if rng is None:
        height, lo, hi = np.zeros_like(z), 0.0, 1.0
    else:
        height = np.log10(np.where(finite, z, rng[0])) if rng[2] else np.where(finite, z, rng[0])
        lo, hi = float(height.min()), float(height.max())
    hi = hi if hi > lo else lo + 1.0
    extent = max(float(xs.max() - xs.min()), float(ys.max() - ys.min()), 1e-12)
    scaled = (height - lo) / (hi - lo)
    grid_x, grid_y = np.meshgrid(xs, ys, indexing="ij")
    vertices = [np.stack([grid_x, grid_y, scaled * 0.5 * extent], axis=-1).reshape(-1, 3)]
    rgb = colormaps["viridis"](scaled.reshape(-1))[:, :3]
    rgb[~finite.reshape(-1)] = 0.5
    colors = [np.round(rgb * 255)]
    nx, ny = z.shape
    index = np.arange(nx * ny).reshape(nx, ny)
    a, b, c, d = index[:-1, :-1], index[1:, :-1], index[1:, 1:], index[:-1, 1:]
    ok = (finite[:-1, :-1] & finite[1:, :-1] & finite[1:, 1:] & finite[:-1, 1:]).reshape(-1)
    quads = np.stack([a, b, c, d], axis=-1).reshape(-1, 4)[ok]
    faces = [quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]]
    size = 0.03 * extent
    start = nx * ny
    for mx, my in [(0.0, 0.0)] if markers is None else markers:
        i, j = int(np.abs(xs - mx).argmin()), int(np.abs(ys - my).argmin())  # at the nearest grid point's height
        base = float(scaled[i, j]) * 0.5 * extent
        vertices.append(
            np.array([[mx, my, base + 3 * size], [mx - size, my - size, base], [mx + size, my - size, base],
                      [mx, my + size, base]])
        )  # fmt: skip
        colors.append(np.tile([[255.0, 0.0, 0.0]], (4, 1)))
        faces.append(start + np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]]))
        start += 4
    return SurfaceMesh(
        np.concatenate(vertices).astype(np.float32)[None],
        np.concatenate(colors).astype(np.uint8)[None],
        np.concatenate(faces).astype(np.int32)[None],
    )


# ---------------------------------------------------------------------------------------------- blocks
__all__ += ["blocks_heatmap_figure", "blocks_norm", "draw_blocks_heatmap"]


def blocks_heatmap_figure(
    names: list[str],
    steps: list[int],
    values: np.ndarray,
    title: str = "Top Hessian eigenvalue per block",
    label: str = "top eigenvalue",
) -> Figure:
    """Blocks (rows, in the model's order) × measurements (columns, by step) heatmap of ``values`` (``[blocks,
    measurements]``; NaN where a block was not measured): which layer sharpens when. Log-scale colour when every
    finite value is > 0. The figure grows with the number of blocks, so a 100-layer model stays readable.

    Example:
        >>> fig = blocks_heatmap_figure(["conv1", "fc"], [10, 20, 30], np.array([[1.0, 2.0, 4.0], [0.5, 0.5, np.nan]]))
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
        ['conv1', 'fc']
    """
    data = np.asarray(values, dtype=float).reshape(len(names), len(steps))
    rows, cols = data.shape
    # at least 6 inches wide, so that a title of ~45 characters is not cut at the left edge with few columns
    fig = Figure(figsize=(min(6.0 + 0.25 * cols, 14.0), min(1.6 + 0.22 * rows, 40.0)), dpi=100)
    ax = fig.add_subplot()
    image = draw_blocks_heatmap(ax, names, steps, data, title)
    log = image.norm.__class__.__name__ == "LogNorm"
    fig.colorbar(image, ax=ax, label=label + (" (log scale)" if log else ""))
    fig.tight_layout()
    return fig


def blocks_norm(*arrays: np.ndarray) -> Any:
    """The colour scale of :func:`draw_blocks_heatmap` for all of ``arrays`` together (log when every finite
    value is > 0), so that several heatmaps can share it."""
    from matplotlib.colors import LogNorm, Normalize

    data = np.concatenate([np.asarray(a, dtype=float).reshape(-1) for a in arrays]) if arrays else np.array([])
    rng = _finite_range(data)
    if rng is None:
        return Normalize(0.0, 1.0)
    return LogNorm(rng[0], rng[1]) if rng[2] else Normalize(rng[0], rng[1])


def draw_blocks_heatmap(
    ax: Any, names: list[str], steps: list[int], data: np.ndarray, title: str, norm: Any = None
) -> Any:
    """Draw the blocks × measurements heatmap into ``ax`` (``norm``: a shared colour scale from
    :func:`blocks_norm`; default this data's own); returns the image (for a colour bar)."""
    data = np.asarray(data, dtype=float).reshape(len(names), len(steps))
    rows, cols = data.shape
    image = ax.imshow(
        np.ma.masked_invalid(data),
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        norm=norm if norm is not None else blocks_norm(data),
    )
    ax.set_yticks(range(rows), names, fontsize=8 if rows <= 40 else 6)
    shown = range(0, cols, max(1, cols // 12))
    ax.set_xticks(list(shown), [str(steps[i]) for i in shown], fontsize=8, rotation=45 if cols > 6 else 0)
    ax.set_xlabel("step")
    ax.set_title(title)
    return image
