"""The optimizer's path on the loss landscape (Li et al. 2018, §7): snapshots on disk, PCA, the plane's loss.

Snapshots ``θ_0, …, θ_{n-1}`` of the measured parameters (flat vectors in the
:class:`~lightning_landscape.functional.ParamSpec` layout) are kept by a :class:`SnapshotStore`, one file per
snapshot, so memory does not grow with their number. :func:`trajectory_pca` finds the two principal directions of
the differences ``θ_i − c`` to a centre ``c`` (the current weights) without holding the snapshots in memory at once:

- the store keeps the Gram matrix ``K_ij = <θ_i − θ_0, θ_j − θ_0>`` relative to its first snapshot; a PCA adds the
  rows of the snapshots taken since the last one, ``chunk`` snapshots in memory at a time and every older one read
  once per chunk (so over a run each pair is computed once);
- one pass gives ``a_i = <θ_i − θ_0, c − θ_0>``, hence the Gram matrix of the differences to the centre,
  ``G_ij = K_ij − a_i − a_j + ‖c − θ_0‖²``; centred (``J G J``, ``J = I − 11ᵀ/n``) when ``centered`` (the PCA of
  Li et al.'s code, which subtracts the mean difference);
- its top eigenpairs ``(λ_k, u_k)`` give the directions as combinations of the snapshots,
  ``v_k = Σ_i w_ki (θ_i − c)`` with ``w_k = J u_k / √λ_k`` (unit vectors, one more pass), the coordinates of the
  path ``G w_k`` (no pass) and the explained-variance ratios ``λ_k / trace(J G J)``.

All of it is float64. The directions are not filter-normalized (Li et al. use the PCA directions as they are).
:func:`trajectory_surface` evaluates the loss on a rectangular grid of the plane that spans the path and the
centre with a margin, through the same grid evaluation as :func:`~lightning_landscape.functional.loss_surface`.

**Sharded models** (FSDP2): every process keeps snapshots of its own local shards (its rows of every parameter,
the layout of :class:`~lightning_landscape.functional._space.ShardedSpace`) in a store of its own. Given that
``space``, :func:`trajectory_pca` sums the local products of each new batch of Gram entries (and of the ``a_i``)
across the processes in one all-reduce, so every process holds the same Gram matrix and takes the same
eigen-decomposition: the path's coordinates and explained variance are the same everywhere, and each direction is
the same local combination of the local snapshots, i.e. this process's rows of the global direction. No process
ever holds the full parameter vector. :func:`trajectory_surface` then writes ``c + x·v_1 + y·v_2`` into the local
shards and restores them exactly (as ``loss_surface`` does on a sharded model).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._space import EUCLIDEAN, ShardedSpace, VectorSpace
from .hvp import LossFn
from .surface import ReduceFn, _evaluate
from .surface import _numel as _direction_numel

__all__ = [
    "SnapshotStore",
    "TrajectoryPlane",
    "TrajectorySurface",
    "plane_grid",
    "trajectory_pca",
    "trajectory_surface",
]

_HALF = (torch.float16, torch.bfloat16)


class SnapshotStore:
    """Snapshots of a flat parameter vector, one ``torch.save`` file each under ``directory``.

    The first snapshot (the reference ``θ_0``) is always stored as given. The others are stored as given too when
    ``dtype`` is ``None`` or the vectors' own dtype (exact); with a half-precision ``dtype`` (``torch.float16`` or
    ``torch.bfloat16``) they are stored as differences ``θ_i − θ_0`` in that dtype, half the bytes of float32, with a
    rounding error of at most ``2⁻¹¹`` (float16) or ``2⁻⁸`` (bfloat16) of each entry of ``θ_i − θ_0``, i.e. relative
    to how far the weights have moved, not to the weights (float16 differences below ``6·10⁻⁸`` flush to zero).

    Only the file paths, steps and the Gram matrix (``n × n``) stay in memory; :meth:`state_dict` holds them for a
    resume. :meth:`thin` drops every other snapshot (keeping the first), which a caller uses to bound disk use.

    Args:
        directory: where the files go (created if needed).
        dtype: storage dtype of the snapshots after the first (see above); ``None`` keeps the vectors' dtype.

    Example:
        >>> import tempfile
        >>> store = SnapshotStore(tempfile.mkdtemp())
        >>> store.add(torch.tensor([1.0, 2.0]), step=0)
        >>> store.add(torch.tensor([2.0, 4.0]), step=10)
        >>> len(store), store.steps
        (2, [0, 10])
        >>> store.difference(1)                 # θ_1 − θ_0, float64
        tensor([1., 2.], dtype=torch.float64)
    """

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"`directory` must be a path, got {type(directory).__name__}.")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"`dtype` must be None or a floating-point torch.dtype, got {dtype!r}.")
        self.directory = os.fspath(directory)
        self.dtype = dtype
        self.paths: list[str] = []
        self.steps: list[int] = []
        self.deltas: list[bool] = []  # stored as θ_i − θ_0 (half precision)
        #: ``K_ij = <θ_i − θ_0, θ_j − θ_0>`` for the first ``gram_size`` snapshots (float64, CPU)
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self._reference: Tensor | None = None  # θ_0 in float64 on the CPU (one vector)
        self._reference_on: Tensor | None = None  # and on the device of the last PCA
        self._numel: int | None = None  # entries of each snapshot, once the first is stored

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def gram_size(self) -> int:
        """How many snapshots the cached Gram matrix covers (the first ones)."""
        return self.gram.shape[0]

    def bytes_per_snapshot(self, numel: int, dtype: torch.dtype) -> int:
        """Bytes of one stored snapshot of ``numel`` entries of ``dtype`` (after the first; file overhead aside)."""
        stored = self.dtype if self.dtype in _HALF else dtype
        return numel * torch.empty(0, dtype=stored).element_size()

    def add(self, vector: Tensor, step: int) -> None:
        """Write ``vector`` (a flat tensor on any device) as the snapshot at ``step``."""
        if not isinstance(vector, Tensor) or vector.dim() != 1 or not vector.is_floating_point():
            raise ValueError("`vector` must be a flat floating-point tensor.")
        if self.paths and vector.numel() != self.numel:
            raise ValueError(f"`vector` must have {self.numel} entries like the first snapshot, got {vector.numel()}.")
        os.makedirs(self.directory, exist_ok=True)
        vector = vector.detach()
        delta = bool(self.paths) and self.dtype in _HALF and self.dtype != vector.dtype
        if delta:
            stored = (vector.to(torch.float64).cpu() - self._reference_vector()).to(self.dtype)
        else:
            stored = vector.to(device="cpu", copy=True)
        path = os.path.join(self.directory, f"snapshot_{len(self.paths):05d}_step{step:09d}.pt")
        while path in self.paths or os.path.exists(path):  # a resumed run writing beside its own old files
            path = path[:-3] + "_.pt"
        torch.save(stored, path)
        if not self.paths:
            self._numel = vector.numel()
        self.paths.append(path)
        self.steps.append(int(step))
        self.deltas.append(delta)

    @property
    def numel(self) -> int | None:
        """Entries of each snapshot (``None`` while the store is empty)."""
        if not self.paths:
            return None
        if self._numel is None:  # restored from a state without it: the first file says
            self._numel = self._reference_vector().numel()
        return self._numel

    def _reference_vector(self) -> Tensor:
        if self._reference is None:
            self._reference = torch.load(self.paths[0], weights_only=True).to(torch.float64)
        return self._reference

    def difference(self, index: int, device: torch.device | str = "cpu") -> Tensor:
        """``θ_index − θ_0`` in float64 on ``device`` (read from disk)."""
        stored = torch.load(self.paths[index], weights_only=True, map_location=device)
        if self.deltas[index]:
            return stored.to(torch.float64)
        return stored.to(torch.float64) - self.reference(device)

    def reference(self, device: torch.device | str = "cpu") -> Tensor:
        """``θ_0`` in float64 on ``device`` (kept there for the next call: one copy per PCA, not per read)."""
        device = torch.device(device)
        cached = self._reference_on
        if cached is None or cached.device != device:
            cached = self._reference_on = self._reference_vector().to(device)
        return cached

    def thin(self) -> list[str]:
        """Drop the snapshots at odd positions (the first is kept); return their paths (the caller deletes the
        files, e.g. once no checkpoint refers to them)."""
        return self.select(range(0, len(self.paths), 2))

    def select(self, indices: Sequence[int] | range) -> list[str]:
        """Keep only the snapshots at ``indices`` (increasing, starting with 0: the reference stays), with their rows
        of the cached Gram matrix; return the dropped paths (their files are left for the caller to delete)."""
        keep = list(indices)
        if not keep or keep[0] != 0 or any(b <= a for a, b in itertools.pairwise(keep)):
            raise ValueError(f"`indices` must increase and start with 0 (the reference snapshot), got {keep[:5]}.")
        kept = set(keep)
        dropped = [p for i, p in enumerate(self.paths) if i not in kept]
        self.paths = [self.paths[i] for i in keep]
        self.steps = [self.steps[i] for i in keep]
        self.deltas = [self.deltas[i] for i in keep]
        cached = [i for i in keep if i < self.gram_size]  # increasing indices: still the leading block
        self.gram = self.gram[cached][:, cached].clone()
        return dropped

    def state_dict(self) -> dict[str, Any]:
        """Paths, steps, storage kinds and the Gram matrix (what a resume needs; the files stay where they are)."""
        return {
            "paths": list(self.paths),
            "steps": list(self.steps),
            "deltas": list(self.deltas),
            "gram": self.gram.clone(),
            "numel": self._numel,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.paths, self.steps, self.deltas = list(state["paths"]), list(state["steps"]), list(state["deltas"])
        self.gram = state["gram"].clone()
        self._numel = state.get("numel")
        self._reference = self._reference_on = None


class _InMemory:
    """A list of flat vectors with the store's reading interface (for :func:`trajectory_pca` on tensors)."""

    def __init__(self, vectors: Sequence[Tensor]) -> None:
        self.vectors = [v.detach().reshape(-1) for v in vectors]
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self.steps = list(range(len(self.vectors)))

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def gram_size(self) -> int:
        return self.gram.shape[0]

    def reference(self, device: torch.device | str = "cpu") -> Tensor:
        return self.vectors[0].to(device=device, dtype=torch.float64)

    def difference(self, index: int, device: torch.device | str = "cpu") -> Tensor:
        return self.vectors[index].to(device=device, dtype=torch.float64) - self.reference(device)


# ---------------------------------------------------------------------------------------------- the PCA
@dataclass
class TrajectoryPlane:
    """The plane of the path's top-2 principal directions through a centre ``c``.

    Attributes:
        directions: ``[2, numel]`` float64 unit vectors ``v_1, v_2`` (orthogonal), in the ``ParamSpec`` layout
            (for a sharded model: this process's rows of them, in the layout of its snapshots).
        coords: ``[n, 2]`` float64, ``<θ_i − c, v_k>``: the path in the plane (the centre is the origin).
        explained_variance: ``[2]`` float64, the share of the path's variance along each direction (``λ_k`` over
            the sum of all eigenvalues): the plane shows the path faithfully only when their sum is near 1.
        steps: the training step of each snapshot.
        centered: whether the mean difference was subtracted before the PCA.
    """

    directions: Tensor
    coords: Tensor
    explained_variance: Tensor
    steps: list[int] = field(default_factory=list)
    centered: bool = True

    def to(self, device: torch.device | str) -> TrajectoryPlane:
        """The same plane with its directions on ``device``."""
        return TrajectoryPlane(self.directions.to(device), self.coords, self.explained_variance, self.steps,
                               self.centered)  # fmt: skip


def _product(a: Tensor, b: Tensor) -> Tensor:
    return a @ b.T if b.dim() == 2 else a @ b


def _local_products(space: VectorSpace, a: Tensor, b: Tensor) -> Tensor:
    """``a @ bᵀ`` (``b`` rows ``[q, n]``) or ``a @ b`` (``b`` a vector ``[n]``) over the parameter entries this
    process counts (a replicated parameter on one process only), not yet summed across processes."""
    if isinstance(space, ShardedSpace):
        return space._local(_product, a, b)
    return _product(a, b)


def _sum_across(space: VectorSpace, t: Tensor, device: torch.device) -> Tensor:
    """``t`` (CPU) summed over the processes of a sharded ``space`` in one all-reduce (on ``device``, the
    products' device, which the collective's backend takes); ``t`` itself otherwise."""
    if not isinstance(space, ShardedSpace):
        return t
    return space._reduce(t.to(device)).cpu()


def _update_gram(source: SnapshotStore | _InMemory, device: torch.device, chunk: int, space: VectorSpace) -> None:
    """Extend ``source.gram`` to all its snapshots: ``chunk`` new ones in memory at a time, every older one read
    once per chunk; a sharded ``space`` sums the new entries' local products in one all-reduce."""
    n, done = len(source), source.gram_size
    if done == n:
        return
    rows = torch.zeros(n - done, n, dtype=torch.float64)  # the new rows, up to each chunk's last column
    chunks = [(start, min(start + chunk, n)) for start in range(done, n, chunk)]
    for start, stop in chunks:
        block = torch.stack([source.difference(i, device) for i in range(start, stop)])  # [b, numel]
        rows[start - done : stop - done, start:stop] = _local_products(space, block, block).cpu()
        for j in range(start):
            rows[start - done : stop - done, j] = _local_products(space, block, source.difference(j, device)).cpu()
    rows = _sum_across(space, rows, device)
    gram = torch.zeros(n, n, dtype=torch.float64)
    gram[:done, :done] = source.gram
    for start, stop in chunks:
        mine = rows[start - done : stop - done]
        gram[start:stop, :stop] = mine[:, :stop]
        gram[:start, start:stop] = mine[:, :start].T
    source.gram = gram


def trajectory_pca(
    snapshots: SnapshotStore | Sequence[Tensor],
    center: Tensor,
    *,
    centered: bool = True,
    chunk: int = 4,
    device: torch.device | str | None = None,
    space: VectorSpace | None = None,
) -> TrajectoryPlane:
    """The top-2 principal directions of ``{θ_i − center}``, the path's coordinates on them and their explained
    variance (Li et al. 2018, §7), computed through the snapshots' Gram matrix (see the module docstring).

    Signs: each direction is oriented so that the path's coordinate of largest magnitude along it is negative (the
    path usually starts far out there and ends near the centre, the origin).

    Args:
        snapshots: a :class:`SnapshotStore` (read from disk, its Gram matrix cached and extended) or flat vectors.
        center: the flat vector ``c`` (e.g. the current weights), the origin of the plane.
        centered: subtract the mean difference first (as a PCA does; Li et al.'s code); ``False`` takes the
            principal directions of the raw differences.
        chunk: snapshots held in memory at once while the Gram matrix is extended (memory on ``device``: about
            ``chunk + 5`` float64 vectors of the parameters' size, whatever the number of snapshots).
        device: where the products run (default: ``center``'s device).
        space: ``None`` (whole vectors) or the :class:`~lightning_landscape.functional._space.ShardedSpace` of a
            sharded model, whose snapshots and ``center`` are then this process's local rows: the Gram matrix's
            entries are summed across its processes (one all-reduce per PCA for the new entries, one for the
            centre's), every process gets the same coordinates and explained variance, and its rows of the
            directions. Every process must call it at the same time, with as many snapshots.

    Raises:
        ValueError: on fewer than 3 snapshots (2 without centring), a ``center`` of the wrong size, a ``space``
            of another length, or a path that spans fewer than two dimensions (the second direction is then
            undefined).

    Example:
        >>> snaps = [torch.tensor([4.0, 1.0, 0.0]), torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 0.5, 0.0])]
        >>> plane = trajectory_pca(snaps, center=torch.zeros(3))
        >>> plane.directions.abs().sum(dim=0)[2].item()          # the path never leaves the first two axes
        0.0
        >>> round(plane.explained_variance.sum().item(), 12)     # so the plane explains all of it
        1.0
    """
    source = snapshots if isinstance(snapshots, SnapshotStore) else _InMemory(list(snapshots))
    if isinstance(centered, bool) is False:
        raise TypeError(f"`centered` must be True or False, got {centered!r}.")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"`chunk` must be a positive integer, got {chunk!r}.")
    n, needed = len(source), 3 if centered else 2
    if n < needed:
        raise ValueError(f"`snapshots`: the PCA needs at least {needed} snapshots (centered={centered}), got {n}.")
    if not isinstance(center, Tensor) or center.dim() != 1:
        raise ValueError("`center` must be a flat tensor.")
    space = EUCLIDEAN if space is None else space
    if not isinstance(space, VectorSpace):
        raise TypeError(f"`space` must be None or a VectorSpace (a sharded model's ShardedSpace), got {space!r}.")
    dev = torch.device(device) if device is not None else center.device
    reference = source.reference(dev)
    if center.numel() != reference.numel():
        raise ValueError(f"`center` must have {reference.numel()} entries like the snapshots, got {center.numel()}.")
    if isinstance(space, ShardedSpace) and space.numel != reference.numel():
        raise ValueError(f"`space` holds {space.numel} local entries, the snapshots {reference.numel()}.")
    _update_gram(source, dev, chunk, space)
    offset = center.detach().to(device=dev, dtype=torch.float64) - reference  # c − θ_0
    local = [_local_products(space, source.difference(i, dev), offset) for i in range(n)]
    local.append(_local_products(space, offset, offset))
    products = _sum_across(space, torch.stack(local).cpu(), dev)  # [a_0 … a_{n-1}, ‖c − θ_0‖²]
    a = products[:n]
    gram = source.gram - a[:, None] - a[None, :] + float(products[n])  # <θ_i − c, θ_j − c>
    gram = (gram + gram.T) / 2
    proj = torch.eye(n, dtype=torch.float64) - (1.0 / n if centered else 0.0)
    inner = proj @ gram @ proj
    values, vectors = torch.linalg.eigh(inner)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    total = float(values.clamp(min=0).sum())
    if not total > 0 or not values[1] > 1e-12 * values[0]:
        raise ValueError(
            "`snapshots`: the path spans fewer than two dimensions around its mean (too few distinct snapshots), "
            "so the plane's second direction is undefined."
        )
    weights = proj @ vectors[:, :2] / values[:2].sqrt()  # [n, 2]: v_k = Σ_i w_ik (θ_i − c)
    coords = gram @ weights  # [n, 2]
    signs = torch.where(coords.gather(0, coords.abs().argmax(dim=0, keepdim=True)) > 0, -1.0, 1.0)[0]
    weights, coords = weights * signs, coords * signs
    # θ_i − c = (θ_i − θ_0) − (c − θ_0): stream the snapshots once more
    directions = -weights.sum(dim=0).to(dev)[:, None] * offset[None, :]
    for i in range(n):
        directions += weights[i].to(dev)[:, None] * source.difference(i, dev)[None, :]
    if isinstance(source, SnapshotStore):
        source._reference_on = None  # free the device copy until the next PCA
    return TrajectoryPlane(
        directions=directions,
        coords=coords,
        explained_variance=values[:2] / total,
        steps=list(source.steps),
        centered=centered,
    )


# ---------------------------------------------------------------------------------------------- the plane's loss
@dataclass
class TrajectorySurface:
    """The loss on the trajectory plane.

    Attributes:
        x: ``[nx]`` float64 grid values along the first direction (increasing).
        y: ``[ny]`` float64 grid values along the second direction.
        losses: ``[nx, ny]`` float64 on the CPU; ``losses[i, j]`` is the loss at ``c + x[i]·v_1 + y[j]·v_2``;
            non-finite losses are NaN.
        plane: the :class:`TrajectoryPlane` (directions, the path's coordinates, explained variance, steps).
    """

    x: Tensor
    y: Tensor
    losses: Tensor
    plane: TrajectoryPlane

    @property
    def directions(self) -> Tensor:
        """``[2, numel]``, the plane's directions."""
        return self.plane.directions

    @property
    def nonfinite_fraction(self) -> float:
        """The fraction of grid points whose loss was not finite."""
        return float(self.losses.isnan().double().mean())


def plane_grid(coords: Tensor, steps: int, margin: float) -> tuple[Tensor, Tensor]:
    """``steps`` evenly spaced values per axis spanning the path's coordinates and the origin, widened by
    ``margin`` times each axis' span on both sides.

    Example:
        >>> x, y = plane_grid(torch.tensor([[-2.0, -1.0], [-1.0, 1.0]]), steps=3, margin=0.5)
        >>> x.tolist(), y.tolist()
        ([-3.0, -1.0, 1.0], [-2.0, 0.0, 2.0])
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"`steps` must be an integer >= 2 (grid points per axis), got {steps!r}.")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"`margin` must be a finite number >= 0 (a share of the path's span), got {margin!r}.")
    axes = []
    for k in range(2):
        values = torch.cat([coords[:, k].to(torch.float64), torch.zeros(1, dtype=torch.float64)])
        low, high = float(values.min()), float(values.max())
        span = high - low if high > low else 1.0
        axes.append(torch.linspace(low - margin * span, high + margin * span, steps, dtype=torch.float64))
    return axes[0], axes[1]


def trajectory_surface(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    plane: TrajectoryPlane,
    steps: int = 21,
    margin: float = 0.2,
    params: Sequence[Tensor | str] | None = None,
    *,
    eval_mode: bool = True,
    reduce_fn: ReduceFn | None = None,
) -> TrajectorySurface:
    """The probe loss on a ``steps × steps`` grid of the plane through the model's weights ``c`` (the plane's
    centre): ``c + x·v_1 + y·v_2`` over the path's coordinates and the origin, plus ``margin`` of the span on every
    side (:func:`plane_grid`). The module is never written (see
    :func:`~lightning_landscape.functional.loss_surface`, whose evaluation this shares: one forward pass per point
    and batch).

    Args:
        model: the module whose current weights are the plane's centre.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: probe batches on the model's device (sample-weighted mean loss).
        plane: from :func:`trajectory_pca` with ``center`` = the model's weights (``params``' flat vector).
        steps: grid points per axis (>= 2).
        margin: how far the grid extends beyond the path, as a share of its span along each axis.
        params: the parameters the snapshots cover (default those with ``requires_grad``).
        eval_mode: evaluate in eval mode.
        reduce_fn: sums across processes (data parallelism), as in ``loss_surface``.

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> path = [torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])]
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.5, 0.2]]))
        >>> plane = trajectory_pca(path, center=model.weight.detach().reshape(-1))
        >>> s = trajectory_surface(model, loss_fn, [torch.eye(2)], plane, steps=5)
        >>> s.losses.shape
        torch.Size([5, 5])
    """
    numel = _direction_numel(model, params)  # this process's rows when the model is sharded
    if not isinstance(plane, TrajectoryPlane) or plane.directions.shape != (2, numel):
        raise ValueError(f"`plane` must be a TrajectoryPlane with directions of shape [2, {numel}] (the model's).")
    x, y = plane_grid(plane.coords, steps, margin)
    points = [(a, b) for a in x.tolist() for b in y.tolist()]
    losses = _evaluate(model, loss_fn, batches, params, plane.directions, points, eval_mode, reduce_fn)
    return TrajectorySurface(x=x, y=y, losses=losses.reshape(steps, steps), plane=plane)
