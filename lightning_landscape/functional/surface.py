"""1D and 2D slices of the loss around the weights (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

A slice evaluates the probe loss at ``θ + a·δ + b·η`` on a centred grid of ``a`` (and ``b``), where ``δ`` and
``η`` are random directions *filter-normalized* to the weights: every filter of a direction (the slice
``d[i]`` along the first dimension of a parameter with two or more dimensions, i.e. a conv layer's output
channel or a linear layer's row) is rescaled to the norm of the same filter of ``θ``,
``d_f ← d_f · ‖θ_f‖ / ‖d_f‖``, so that a step of 1 changes every filter by as much as it holds, whatever the
scale of the layer (which BatchNorm makes arbitrary).

Directions are flat vectors in the layout of :class:`~lightning_landscape.functional.ParamSpec`: the selected
parameters in ``model.named_parameters()`` order (by default those with ``requires_grad``), each flattened
row-major, concatenated. ``random_directions`` returns them as rows of a ``[count, numel]`` tensor.

The grid never touches the module: each point is formed in one scratch vector, ``(θ + a·δ) + b·η`` (one vector
operation per point; ``θ + a·δ`` once per row), whose views :func:`torch.func.functional_call` substitutes for
the parameters for the whole grid, so the slice costs one forward pass per point and batch and nothing else;
losses stay on the device until one transfer at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._batches import batch_size, scalar_loss, split_batch

if TYPE_CHECKING:
    from ._space import ShardedSpace
from ._params import ParamsArg, ParamSpec, compute_dtype
from ._random import gaussian, make_generator
from ._sharded import ShardedLossOperator, is_sharded, local_shard, sharded_parameters
from .hvp import LossFn, LossOperator, MeasurementError, is_out_of_memory

__all__ = [
    "LineResult",
    "SurfaceResult",
    "check_grid_args",
    "filter_normalize",
    "grid_coords",
    "loss_line",
    "loss_surface",
    "random_directions",
]

ReduceFn = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------- directions
def filter_normalize(
    model: nn.Module,
    directions: Tensor,
    params: ParamsArg = None,
    *,
    include_1d: bool = False,
) -> Tensor:
    """Rescale raw directions filter by filter to the model's current weights.

    For every parameter with two or more dimensions and every filter ``f`` (index along the first
    dimension): ``d_f ← d_f · ‖θ_f‖ / ‖d_f‖``. A filter whose weights or whose direction are all zero gets
    a zero direction (never a division by zero). Parameters with fewer than two dimensions (biases,
    normalization layers) get a zero direction, or with ``include_1d=True`` are normalized as one filter
    each, ``d ← d · ‖θ‖ / ‖d‖`` (Li et al.'s code copies ``θ`` instead, which moves along a fixed, not a
    random, direction).

    Args:
        model: the module whose current weights set the scale.
        directions: ``[numel]`` or ``[k, numel]`` raw directions in the ``ParamSpec(model, params)`` layout.
        params: the parameters the directions cover (tensors or names); default those with ``requires_grad``.
        include_1d: give one-dimensional parameters a (normalized) direction instead of zero.

    Returns:
        New tensor of the same shape, on the model's device and in its dtype; ``directions`` is not modified.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        >>> d = filter_normalize(lin, torch.tensor([1.0, 0.0, 1.0, 1.0, 5.0, 5.0]))
        >>> d                                  # row 0 scaled to norm 5, zero row stays zero, bias zero
        tensor([5., 0., 0., 0., 0., 0.])
    """
    space: ShardedSpace | None = None
    if is_sharded(model):  # local rows: a filter (dim-0 row) is whole on one process; 1-D norms are reduced
        space, theta_all = _sharded_layout(model, params)
        numel, device, param_dtype = sum(t.numel() for t in theta_all), theta_all[0].device, theta_all[0].dtype
        sizes = [t.numel() for t in theta_all]
    else:
        spec = ParamSpec(model, params)
        theta_all, numel, device, param_dtype, sizes = spec.tensors(), spec.numel, spec.device, spec.dtype, spec.sizes
    if not isinstance(directions, Tensor) or directions.dim() not in (1, 2) or directions.shape[-1] != numel:
        shape = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
        raise ValueError(f"`directions` must have shape [{numel}] or [k, {numel}], got {shape}.")
    if not torch.is_floating_point(directions):
        raise TypeError(f"`directions` must be a floating-point tensor, got {directions.dtype}.")
    dtype = compute_dtype(param_dtype)  # float32 for half-precision weights
    flat = directions.detach().to(device=device, dtype=dtype)
    squeeze = flat.dim() == 1
    flat = flat.reshape(-1, numel)
    out = []
    parts = [p.reshape(flat.shape[0], *t.shape) for p, t in zip(flat.split(sizes, dim=-1), theta_all, strict=True)]
    for index, (theta, d) in enumerate(zip([t.to(dtype) for t in theta_all], parts, strict=True)):
        k = d.shape[0]
        if space is not None and theta.dim() < 2 and include_1d:
            # one filter spread over the processes: its norms are reduced (a replicated one counts once)
            theta_norm, d_norm = _sharded_norms(space.slices[index].replicated, space.group, theta, d)
            scale = torch.where(d_norm > 0, theta_norm / torch.where(d_norm > 0, d_norm, 1.0), 0.0)
            out.append(d.reshape(k, -1) * scale)
        elif theta.dim() >= 2:
            theta_norm = theta.reshape(1, theta.shape[0], -1).norm(dim=-1)  # [1, filters]
            d_rows = d.reshape(k, theta.shape[0], -1)
            d_norm = d_rows.norm(dim=-1)  # [k, filters]
            scale = torch.where(d_norm > 0, theta_norm / torch.where(d_norm > 0, d_norm, 1.0), 0.0)
            out.append((d_rows * scale.unsqueeze(-1)).reshape(k, -1))
        elif include_1d:
            theta_norm = theta.norm()
            d_norm = d.reshape(k, -1).norm(dim=-1, keepdim=True)
            scale = torch.where(d_norm > 0, theta_norm / torch.where(d_norm > 0, d_norm, 1.0), 0.0)
            out.append(d.reshape(k, -1) * scale)
        else:
            out.append(torch.zeros(k, theta.numel(), dtype=dtype, device=device))
    result = torch.cat(out, dim=-1)
    return result[0] if squeeze else result


def random_directions(
    model: nn.Module,
    generator: torch.Generator | None = None,
    count: int = 2,
    params: ParamsArg = None,
    *,
    include_1d: bool = False,
) -> Tensor:
    """``count`` filter-normalized Gaussian directions, as rows of a ``[count, numel]`` tensor.

    Raw entries are standard normal (float32), drawn from ``generator`` (default: a fresh CPU generator
    seeded with 0; never the global RNG), then passed through :func:`filter_normalize`. The layout of each
    row is ``ParamSpec(model, params)``'s (see the module docstring).

    Args:
        model: the module.
        generator: the source of randomness.
        count: how many directions (1 for a line, 2 for a plane).
        params: the parameters to move (tensors or names); default those with ``requires_grad``.
        include_1d: also move one-dimensional parameters (biases, normalization layers).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> d = random_directions(net, torch.Generator().manual_seed(0))
        >>> d.shape
        torch.Size([2, 26])
        >>> w = net[0].weight.detach()
        >>> torch.allclose(d[0, :12].reshape(4, 3).norm(dim=1), w.norm(dim=1))
        True
    """
    _check_count(count)
    if is_sharded(model):  # the local rows of the same global draw on every process
        space, locals_ = _sharded_layout(model, params)
        n = sum(t.numel() for t in locals_)
        raw = space.gaussian(count, n, make_generator(generator), torch.float32, locals_[0].device)
        return filter_normalize(model, raw, params, include_1d=include_1d)
    spec = ParamSpec(model, params)
    raw = gaussian((count, spec.numel), make_generator(generator), torch.float32, spec.device)
    return filter_normalize(model, raw, params, include_1d=include_1d)


def _sharded_layout(model: nn.Module, params: Sequence[Tensor | str] | None) -> tuple[ShardedSpace, list[Tensor]]:
    """The vector space and this process's shards (local rows) of an FSDP2-sharded model's measured parameters."""
    from ._space import ShardedSpace

    _, tensors, slices, group, world = sharded_parameters(model, params)
    locals_ = [local_shard(t) for t in tensors]
    return ShardedSpace(slices, group=group, world_size=world), locals_


def _sharded_norms(replicated: bool, group: Any, theta: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """``‖θ‖`` (0-dim) and the row norms ``‖d_i‖`` (``[k, 1]``) of one parameter whose rows are spread over the
    processes of ``group`` (held whole when ``replicated``)."""
    squares = torch.cat([theta.pow(2).sum().reshape(1), d.reshape(d.shape[0], -1).pow(2).sum(dim=1)])
    if not replicated:
        torch.distributed.all_reduce(squares, group=group)
    return squares[0].sqrt(), squares[1:].sqrt().unsqueeze(1)


def _numel(model: nn.Module, params: Sequence[Tensor | str] | None) -> int:
    """Entries of a direction vector: all measured parameters, or this process's rows of them when sharded."""
    if is_sharded(model):
        return sum(t.numel() for t in _sharded_layout(model, params)[1])
    return ParamSpec(model, params).numel


# ---------------------------------------------------------------------------------------------- results
@dataclass
class SurfaceResult:
    """A 2D slice of the loss.

    Attributes:
        coords: ``[steps]`` float64, the grid values of both ``a`` and ``b``, from ``-distance`` to
            ``distance``; the middle one is exactly 0.
        losses: ``[steps, steps]`` float64 on the CPU; ``losses[i, j]`` is the loss at
            ``θ + coords[i]·δ + coords[j]·η``. Non-finite losses (NaN, ±inf) are NaN.
        directions: ``[2, numel]``, ``δ`` and ``η`` as used (in the ``ParamSpec`` layout).
    """

    coords: Tensor
    losses: Tensor
    directions: Tensor

    @property
    def center_loss(self) -> float:
        """The loss at ``θ`` (the middle grid point)."""
        mid = self.coords.numel() // 2
        return float(self.losses[mid, mid])

    @property
    def nonfinite_fraction(self) -> float:
        """The fraction of grid points whose loss was not finite."""
        return float(self.losses.isnan().double().mean())

    def rise_at_edge(self) -> float:
        """Mean of ``loss − center_loss`` over the finite points of the grid's outer ring (NaN if none,
        or if the centre is not finite)."""
        ring = torch.cat([self.losses[0], self.losses[-1], self.losses[1:-1, 0], self.losses[1:-1, -1]])
        finite = ring[ring.isfinite()]
        if finite.numel() == 0:
            return math.nan
        return float(finite.mean()) - self.center_loss


@dataclass
class LineResult:
    """A 1D slice of the loss.

    Attributes:
        coords: ``[steps]`` float64 values of ``a`` from ``-distance`` to ``distance``; the middle one is 0.
        losses: ``[steps]`` float64 on the CPU, the loss at ``θ + coords[i]·δ``; non-finite values are NaN.
        direction: ``[numel]``, ``δ`` as used.
    """

    coords: Tensor
    losses: Tensor
    direction: Tensor

    @property
    def center_loss(self) -> float:
        """The loss at ``θ`` (the middle point)."""
        return float(self.losses[self.coords.numel() // 2])


# ---------------------------------------------------------------------------------------------- grid
def grid_coords(steps: int, distance: float) -> Tensor:
    """``steps`` evenly spaced float64 values from ``-distance`` to ``distance`` whose middle one is exactly 0.

    Example:
        >>> grid_coords(5, 1.0)
        tensor([-1.0000, -0.5000,  0.0000,  0.5000,  1.0000], dtype=torch.float64)
    """
    check_grid_args(distance, steps=steps)
    half = steps // 2
    return torch.arange(-half, half + 1, dtype=torch.float64) * (float(distance) / half)


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    steps: int = 21,
    distance: float = 1.0,
    directions: Tensor | Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    params: ParamsArg = None,
    *,
    include_1d: bool = False,
    eval_mode: bool = True,
    reduce_fn: ReduceFn | None = None,
) -> SurfaceResult:
    """The probe loss on a ``steps × steps`` grid ``θ + a·δ + b·η``, ``a, b ∈ [-distance, distance]``.

    Args:
        model: the module (never written; mode, buffers, ``.grad`` and the global RNG are left as found).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch.
        batches: probe batches on the model's device; the loss is their sample-weighted mean.
        steps: grid points per axis, odd (>= 3) so that the middle one is ``θ``.
        distance: the grid's half-width, in units of the (filter-normalized) directions.
        directions: ``[2, numel]`` (or two ``[numel]`` vectors) used as given, e.g. from
            :func:`random_directions` or :func:`filter_normalize`; default: drawn with
            :func:`random_directions` from ``generator``.
        generator: source of the default directions (default a CPU generator seeded with 0).
        params: the parameters to move (tensors or names); default those with ``requires_grad``.
        include_1d: when drawing directions, also move one-dimensional parameters.
        eval_mode: evaluate in eval mode (BatchNorm statistics, no dropout); in train mode buffers are
            evaluated on copies, restored before every forward pass.
        reduce_fn: sums a tensor across processes (data parallelism); the grid is then the loss over all
            processes' probe data, reduced in one collective at the end.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> x = torch.randn(16, 2)
        >>> s = loss_surface(model, loss_fn, [x], steps=5, generator=torch.Generator().manual_seed(0))
        >>> s.coords.shape, s.losses.shape
        (torch.Size([5]), torch.Size([5, 5]))
        >>> s.losses[2, 2].item() == loss_fn(model, x).item()      # the middle point is θ itself
        True
    """
    coords = grid_coords(steps, distance)
    if directions is None:
        dirs = random_directions(model, generator, 2, params, include_1d=include_1d)
    else:
        dirs = _as_directions(directions, 2, _numel(model, params), "directions")
    values = coords.tolist()
    points = [(a, b) for a in values for b in values]
    losses = _evaluate(model, loss_fn, batches, params, dirs, points, eval_mode, reduce_fn)
    return SurfaceResult(coords=coords, losses=losses.reshape(steps, steps), directions=dirs)


def loss_line(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    steps: int = 41,
    distance: float = 1.0,
    direction: Tensor | None = None,
    generator: torch.Generator | None = None,
    params: ParamsArg = None,
    *,
    include_1d: bool = False,
    eval_mode: bool = True,
    reduce_fn: ReduceFn | None = None,
) -> LineResult:
    """The probe loss at ``θ + a·δ`` for ``steps`` values of ``a`` in ``[-distance, distance]``.

    Arguments as for :func:`loss_surface`; ``direction`` is one ``[numel]`` (or ``[1, numel]``) vector used
    as given, by default drawn with :func:`random_directions` (``count=1``).

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> x = torch.tensor([[1.0, 0.0]])
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> line = loss_line(model, loss_fn, [x], steps=3, direction=torch.tensor([1.0, 0.0]))
        >>> line.losses                        # (1 + a)² at a = -1, 0, 1
        tensor([0., 1., 4.], dtype=torch.float64)
    """
    coords = grid_coords(steps, distance)
    if direction is None:
        dirs = random_directions(model, generator, 1, params, include_1d=include_1d)
    else:
        dirs = _as_directions(direction, 1, _numel(model, params), "direction")
    points = [(a, None) for a in coords.tolist()]
    losses = _evaluate(model, loss_fn, batches, params, dirs, points, eval_mode, reduce_fn)
    return LineResult(coords=coords, losses=losses, direction=dirs[0])


class _GridModule(nn.Module):
    """Holds the model so that ``functional_call`` substitutes its parameters once for a whole grid."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, run: Callable[[nn.Module], Tensor]) -> Tensor:
        return run(self.model)


def _evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    params: Sequence[Tensor | str] | None,
    directions: Tensor,
    points: list[tuple[float, float | None]],
    eval_mode: bool,
    reduce_fn: ReduceFn | None,
) -> Tensor:
    """Losses at ``θ + a·d0 (+ b·d1)`` for every ``(a, b)`` in ``points``: ``[len(points)]`` float64, CPU.

    The module's parameters are replaced (through ``functional_call``, for the whole grid) by views of one
    scratch vector that is overwritten in place for each point; the weights themselves are never written.
    An FSDP2-sharded module is evaluated through :class:`ShardedLossOperator` instead: ``θ + δ`` written into
    the local shards, restored by exact copy after each point (``directions`` are then local rows).
    """
    if is_sharded(model):
        with ShardedLossOperator(model, loss_fn, batches, params, eval_mode=eval_mode) as op:
            dirs = directions.to(device=op.device, dtype=op.dtype)
            values = []
            for a, b in points:
                delta = a * dirs[0] + (b * dirs[1] if b is not None else 0.0)
                values.append(op.loss(delta).to(torch.float64))
            losses = torch.stack(values).cpu()
        return torch.where(losses.isfinite(), losses, math.nan)
    # LossOperator's context: eval mode (restored on exit), autocast off, grad mode sane under inference_mode,
    # inference tensors in the batches cloned.
    with LossOperator(model, loss_fn, batches, params, eval_mode=eval_mode) as op, torch.no_grad():
        spec = op.spec
        theta = op.parameter_vector()  # half-precision parameters are measured in float32 (op.dtype)
        dirs = directions.to(device=spec.device, dtype=op.dtype)
        point = theta.clone()
        views = dict(zip(spec.names, spec.split(point), strict=True))
        selected = set(spec.names)
        tensors = {
            "model." + n: views[n] if n in selected else op._input(p.detach()) for n, p in model.named_parameters()
        }
        buffer_pairs = []
        for n, b in model.named_buffers():
            if not eval_mode or (op.dtype != spec.dtype and b.is_floating_point()):
                # train-mode forward passes update running statistics: give them copies (float32 ones when upcasting)
                scratch = op._input(b.detach()).clone()
                tensors["model." + n] = scratch
                buffer_pairs.append((scratch, b.detach()))
        counts = [batch_size(b) for b in op.batches]
        device = spec.device

        row = torch.empty_like(theta) if any(b is not None for _, b in points) else point
        row_a: float | None = None
        pieces = 1  # grows when a batch does not fit in memory; kept for the rest of the grid

        def batch_loss(net: nn.Module, batch: Any) -> Tensor:
            nonlocal pieces
            while True:
                try:
                    parts = split_batch(batch, pieces) if pieces > 1 else [batch]
                    total = sum(batch_size(p) * scalar_loss(loss_fn(net, p)) for p in parts)
                    return total / batch_size(batch)
                except Exception as err:
                    if not is_out_of_memory(err) or pieces >= batch_size(batch):
                        raise
                    pieces *= 2
                    if device.type == "cuda":
                        torch.cuda.empty_cache()

        def run(net: nn.Module) -> Tensor:
            nonlocal row_a
            values = []  # 0-dim device tensors, no host synchronisation until the end
            for a, b in points:  # one vector operation per point: point = (θ + a·δ) + b·η
                if a != row_a:
                    torch.add(theta, dirs[0], alpha=a, out=row)
                    row_a = a
                if b is not None:
                    torch.add(row, dirs[1], alpha=b, out=point)
                for batch in op.batches:
                    for scratch, original in buffer_pairs:
                        scratch.copy_(original)  # (casts too)
                    values.append(batch_loss(net, batch))
            return torch.stack(values).reshape(len(points), len(op.batches))

        failure: BaseException | None = None
        try:
            with torch.enable_grad():  # a loss that reads parameters around functional_call would give a flat slice
                op.check_substitution()
            local = functional_call(_GridModule(model), tensors, (run,))  # the operator forked the RNGs
            weights = torch.tensor(counts, dtype=torch.float64, device=local.device)
            sums = local.to(torch.float64) @ weights  # [points]: sum of the loss over this process's samples
        except Exception as err:
            if reduce_fn is None:
                raise
            failure, sums = err, torch.zeros(len(points), dtype=torch.float64, device=device)
        total = torch.tensor([float(sum(counts))], dtype=torch.float64, device=sums.device)
        if reduce_fn is not None:
            flag = torch.tensor([0.0 if failure is None else 1.0], dtype=torch.float64, device=sums.device)
            packed = reduce_fn(torch.cat([sums, total, flag])).cpu()
            if failure is not None or packed[-1] > 0:
                raise MeasurementError("the loss slice failed on at least one process") from failure
            sums, total = packed[:-2], packed[-2:-1]
        losses = (sums / total).cpu()
    return torch.where(losses.isfinite(), losses, math.nan)


# ---------------------------------------------------------------------------------------------- checks
def check_grid_args(distance: object, **steps: object) -> None:
    """Raise a ``ValueError`` naming the argument unless each of ``steps`` (given by name) is an odd integer
    >= 3 and ``distance`` a finite number > 0.

    Example:
        >>> check_grid_args(1.0, steps=11, steps_1d=21)
        >>> check_grid_args(1.0, steps_1d=20)
        Traceback (most recent call last):
        ...
        ValueError: `steps_1d` must be an odd integer >= 3 (the middle point is θ itself), got 20.
    """
    for name, value in steps.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 3 or value % 2 == 0:
            raise ValueError(f"`{name}` must be an odd integer >= 3 (the middle point is θ itself), got {value!r}.")
    if (
        isinstance(distance, bool)
        or not isinstance(distance, (int, float))
        or not math.isfinite(distance)
        or distance <= 0
    ):
        raise ValueError(f"`distance` must be a finite number > 0, got {distance!r}.")


def _check_count(count: object) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` must be a positive integer (1 for a line, 2 for a plane), got {count!r}.")


def _as_directions(value: Tensor | Sequence[Tensor], count: int, numel: int, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        try:
            value = torch.stack(list(value))
        except (TypeError, RuntimeError) as err:
            raise TypeError(
                f"`{name}` must be a tensor of shape [{count}, {numel}], got {type(value).__name__}."
            ) from err
    if value.dim() == 1 and count == 1:
        value = value.unsqueeze(0)
    if value.shape != (count, numel):
        expected = f"[{numel}] or [1, {numel}]" if count == 1 else f"[{count}, {numel}]"
        raise ValueError(f"`{name}` must have shape {expected}, got {tuple(value.shape)}.")
    if not torch.is_floating_point(value):
        raise TypeError(f"`{name}` must be a floating-point tensor, got {value.dtype}.")
    return value.detach()
