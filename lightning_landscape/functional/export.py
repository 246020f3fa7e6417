"""Export a loss surface for other tools: ``.npz`` (numpy) always, ``.vtk`` / ``.vtu`` (ParaView, VisIt) via meshio.

:func:`save_surface` takes a :class:`~lightning_landscape.functional.SurfaceResult` (a 2D slice around the
weights) or a :class:`~lightning_landscape.functional.trajectory.TrajectorySurface` (the trajectory plane) and
writes, by the file's extension:

- ``.npz``: ``x``, ``y`` (grid values along each direction), ``losses`` (``[nx, ny]``, NaN where not finite),
  ``kind`` (``"slice"`` or ``"trajectory"``), ``numel`` and ``direction_norms`` (the directions' metadata); for a
  trajectory also ``path`` (``[n, 2]``), ``path_steps``, ``explained_variance`` and ``centered``; the directions
  themselves (``[2, numel]``, large) only with ``include_directions=True``.
- ``.vtk`` (legacy VTK) or ``.vtu`` (VTK XML): the grid as a quad surface with height ``log10 loss`` (``height=
  "loss"`` for the loss itself, ``"flat"`` for 0), point data ``loss`` and ``log10_loss``; quads with a non-finite
  corner are left out; a trajectory's path is added as a polyline (``line`` cells) at the surface's height
  (bilinear), with point data ``step`` (−1 on the grid). Needs ``meshio`` (the ``test`` extra, or
  ``pip install meshio``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .surface import SurfaceResult
from .trajectory import TrajectorySurface

__all__ = ["save_surface"]

HEIGHTS = ("log10", "loss", "flat")


def _grid(result: SurfaceResult | TrajectorySurface) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(result, TrajectorySurface):
        x, y = result.x, result.y
    else:
        x = y = result.coords
    return (x.detach().double().cpu().numpy(), y.detach().double().cpu().numpy(),
            result.losses.detach().double().cpu().numpy())  # fmt: skip


def save_surface(
    result: SurfaceResult | TrajectorySurface,
    path: str | os.PathLike,
    *,
    include_directions: bool = False,
    height: str = "log10",
) -> str:
    """Write ``result`` to ``path`` (format by extension: ``.npz``, ``.vtk``, ``.vtu``; see the module docstring)
    and return the path.

    Args:
        result: a 2D loss slice (``loss_surface``) or a trajectory plane (``trajectory_surface``).
        path: the file to write (its folder must exist).
        include_directions: also store the two ``[numel]`` directions in the ``.npz``.
        height: the VTK surface's height: ``"log10"`` (of the loss; the loss itself when some finite loss is
            <= 0), ``"loss"`` or ``"flat"``.

    Example:
        >>> import tempfile, numpy as np, torch
        >>> from lightning_landscape.functional.surface import loss_surface
        >>> model = torch.nn.Linear(2, 1)
        >>> s = loss_surface(model, lambda m, b: m(b).pow(2).mean(), [torch.randn(8, 2)], steps=3)
        >>> f = save_surface(s, tempfile.mkdtemp() + "/slice.npz")
        >>> data = np.load(f)
        >>> data["losses"].shape, str(data["kind"]), int(data["numel"])
        ((3, 3), 'slice', 3)
    """
    if not isinstance(result, (SurfaceResult, TrajectorySurface)):
        raise TypeError(f"`result` must be a SurfaceResult or a TrajectorySurface, got {type(result).__name__}.")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file path, got {type(path).__name__}.")
    if height not in HEIGHTS:
        raise ValueError(f"`height` must be one of {HEIGHTS}, got {height!r}.")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        _save_npz(result, path, include_directions)
    elif ext in (".vtk", ".vtu"):
        _save_vtk(result, path, height)
    else:
        raise ValueError(f"`path` must end in .npz, .vtk or .vtu, got {ext or 'no extension'!r} ({path}).")
    return path


def _save_npz(result: SurfaceResult | TrajectorySurface, path: str, include_directions: bool) -> None:
    x, y, losses = _grid(result)
    directions = result.directions.detach()
    data: dict[str, Any] = {
        "x": x,
        "y": y,
        "losses": losses,
        "kind": np.array("trajectory" if isinstance(result, TrajectorySurface) else "slice"),
        "numel": np.array(directions.shape[-1]),
        "direction_norms": directions.double().norm(dim=-1).cpu().numpy(),
    }
    if isinstance(result, TrajectorySurface):
        plane = result.plane
        data.update(
            path=plane.coords.double().cpu().numpy(),
            path_steps=np.asarray(plane.steps, dtype=np.int64),
            explained_variance=plane.explained_variance.double().cpu().numpy(),
            centered=np.array(plane.centered),
        )
    if include_directions:
        data["directions"] = directions.cpu().numpy()
    with open(path, "wb") as f:  # np.savez would append ".npz" to a name without it
        np.savez(f, **data)


def _heights(losses: np.ndarray, height: str) -> np.ndarray:
    finite = np.isfinite(losses)
    if height == "flat" or not finite.any():
        return np.zeros_like(losses)
    floor = float(losses[finite].min())
    filled = np.where(finite, losses, floor)
    return np.log10(filled) if height == "log10" and floor > 0 else filled


def _bilinear(xs: np.ndarray, ys: np.ndarray, values: np.ndarray, px: float, py: float) -> float:
    """``values`` (on the grid ``xs × ys``) at ``(px, py)``, bilinear; clamped to the grid's edge."""
    i = int(np.clip(np.searchsorted(xs, px) - 1, 0, len(xs) - 2))
    j = int(np.clip(np.searchsorted(ys, py) - 1, 0, len(ys) - 2))
    tx = float(np.clip((px - xs[i]) / (xs[i + 1] - xs[i]), 0.0, 1.0))
    ty = float(np.clip((py - ys[j]) / (ys[j + 1] - ys[j]), 0.0, 1.0))
    top = (1 - tx) * values[i, j] + tx * values[i + 1, j]
    bottom = (1 - tx) * values[i, j + 1] + tx * values[i + 1, j + 1]
    return float((1 - ty) * top + ty * bottom)


def _save_vtk(result: SurfaceResult | TrajectorySurface, path: str, height: str) -> None:
    try:
        import meshio
    except ImportError as err:
        raise ImportError(
            "save_surface to .vtk/.vtu needs meshio: `pip install meshio` (or the package's `test` extra)."
        ) from err
    x, y, losses = _grid(result)
    z = _heights(losses, height)
    nx, ny = losses.shape
    gx, gy = np.meshgrid(x, y, indexing="ij")
    points = [np.stack([gx, gy, z], axis=-1).reshape(-1, 3)]
    finite = np.isfinite(losses)
    index = np.arange(nx * ny).reshape(nx, ny)
    ok = (finite[:-1, :-1] & finite[1:, :-1] & finite[1:, 1:] & finite[:-1, 1:]).reshape(-1)
    quads = np.stack([index[:-1, :-1], index[1:, :-1], index[1:, 1:], index[:-1, 1:]], axis=-1).reshape(-1, 4)[ok]
    cells = [("quad", quads)]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_loss = np.log10(losses)
    loss_data, log_data = [losses.reshape(-1)], [log_loss.reshape(-1)]
    step_data = [np.full(nx * ny, -1.0)]
    if isinstance(result, TrajectorySurface):
        coords = result.plane.coords.double().cpu().numpy()
        filled_loss = np.where(finite, losses, np.nan)
        path_points = np.array([[px, py, _bilinear(x, y, z, px, py)] for px, py in coords])
        path_loss = np.array([_bilinear(x, y, filled_loss, px, py) for px, py in coords])
        points.append(path_points)
        start = nx * ny
        cells.append(("line", np.stack([np.arange(len(coords) - 1), np.arange(1, len(coords))], axis=-1) + start))
        loss_data.append(path_loss)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_data.append(np.log10(path_loss))
        step_data.append(np.asarray(result.plane.steps, dtype=np.float64))
    point_data = {"loss": np.concatenate(loss_data), "log10_loss": np.concatenate(log_data),
                  "step": np.concatenate(step_data)}  # fmt: skip
    mesh = meshio.Mesh(np.concatenate(points), cells, point_data=point_data)
    mesh.write(path, file_format="vtk" if path.lower().endswith(".vtk") else "vtu")
