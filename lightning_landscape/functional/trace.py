"""Hessian trace (Hutchinson, Hutch++) and spectral density (stochastic Lanczos quadrature)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._lanczos import lanczos
from ._operator import SymmetricOperator
from ._params import ParamsArg
from ._random import make_generator
from ._space import EUCLIDEAN
from .curvature import OutputFn, OutputLoss, curvature_operator
from .hvp import LossFn

__all__ = [
    "DensityResult",
    "TraceResult",
    "hessian_density",
    "hessian_trace",
    "slq_density",
    "trace_estimate",
]

TRACE_METHODS = ("hutch++", "hutchinson")


@dataclass
class TraceResult:
    """A trace estimate, its standard error and what it cost."""

    estimate: float
    stderr: float
    num_hvps: int
    method: str
    hvp_method: str = ""


@dataclass
class DensityResult:
    """A smoothed spectral density ``density`` over the eigenvalue ``grid``.

    ``nodes``/``weights`` (``[probes, steps]``) are the Gauss quadrature nodes and weights
    behind it; the density integrates to one over the grid.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_hvps: int
    hvp_method: str = ""


def _quadratic_forms(operator: SymmetricOperator, vectors: Tensor) -> Tensor:
    space = getattr(operator, "space", EUCLIDEAN)
    return space.row_dots(vectors, operator.matmat(vectors)).double()


def trace_estimate(
    operator: SymmetricOperator,
    num_hvps: int = 99,
    *,
    method: str = "hutch++",
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` of a symmetric operator from ``num_hvps`` products.

    Hutch++ (Meyer et al. 2021) spends a third of the budget sketching the dominant subspace
    ``Q = orth(A S)``, takes ``tr(QᵀAQ)`` exactly (another third) and estimates the rest,
    ``tr((I-QQᵀ)A(I-QQᵀ))``, by Hutchinson with Rademacher vectors (the last third). The
    standard error is that of the Hutchinson part. ``method="hutchinson"`` spends all on
    Hutchinson. Products are batched. Reductions over the parameters, the orthonormalization and the probe
    draws go through the operator's ``space``.

    Example:
        >>> from lightning_landscape.functional import DenseOperator
        >>> a = torch.diag(torch.arange(1.0, 11.0))
        >>> round(trace_estimate(DenseOperator(a), 30).estimate, 3)
        55.0
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"`method` must be one of {TRACE_METHODS}, got {method!r}.")
    min_hvps = 3 if method == "hutch++" else 1
    if num_hvps < min_hvps:
        raise ValueError(f"`num_hvps` must be >= {min_hvps} for {method}, got {num_hvps}.")
    generator = make_generator(generator)
    n, dtype, device = operator.size, operator.dtype, torch.device(operator.device)
    space = getattr(operator, "space", EUCLIDEAN)
    exact = 0.0
    if method == "hutch++":
        sketch = min(num_hvps // 3, space.dimension(n))
        s = space.rademacher(sketch, n, generator, dtype, device)
        q, _ = space.orthonormal_rows(operator.matmat(s))  # [sketch, n]
        q = q.contiguous()
        exact = float(_quadratic_forms(operator, q).sum())
        tests = num_hvps - 2 * sketch
        g = space.rademacher(tests, n, generator, dtype, device)
        g = g - space.inner(g, q) @ q
    else:
        tests = num_hvps
        g = space.rademacher(tests, n, generator, dtype, device)
    forms = _quadratic_forms(operator, g) if tests > 0 else torch.zeros(0, dtype=torch.float64)
    rest = float(forms.mean()) if tests > 0 else 0.0
    stderr = float(forms.std() / math.sqrt(tests)) if tests > 1 else float("nan")
    return TraceResult(exact + rest, stderr, num_hvps, method, getattr(operator, "method", ""))


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Sequence[Any],
    num_hvps: int = 99,
    *,
    method: str = "hutch++",
    params: ParamsArg = None,
    generator: torch.Generator | None = None,
    hvp_method: str = "auto",
    eval_mode: bool = True,
    curvature: str = "hessian",
    output_fn: OutputFn | None = None,
    output_loss: str | OutputLoss | None = None,
    mc_samples: int = 1,
) -> TraceResult:
    """Trace of the Hessian of the probe loss (Hutch++ by default, ``num_hvps`` products), or of its GGN or Fisher.

    ``curvature``, ``output_fn``, ``output_loss``, ``mc_samples``: as in
    :func:`~lightning_landscape.functional.eigen.hessian_eigenvalues` (``loss_fn=None`` with the split loss; the
    ``generator`` also draws the Monte-Carlo Fisher's targets).

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.randn(32, 3)
        >>> loss_fn = lambda m, b: 0.5 * m(b).pow(2).mean()
        >>> t = hessian_trace(model, loss_fn, [x])
        >>> exact = (x.pow(2).sum() / 32 + 1).item()   # tr(XᵀX/n) + the bias term
        >>> abs(t.estimate - exact) < 1e-4
        True
        >>> y = torch.randint(0, 3, (32,))
        >>> ggn = hessian_trace(torch.nn.Linear(3, 3), None, [(x, y)], 12, curvature="ggn", output_loss="cross_entropy")
        >>> ggn.hvp_method
        'ggn/jvp'
    """
    if curvature == "fisher":  # one generator for the probes and the sampled targets
        generator = make_generator(generator)
    with curvature_operator(
        model, loss_fn, batches, params, curvature=curvature, output_fn=output_fn, output_loss=output_loss,
        hvp_method=hvp_method, eval_mode=eval_mode, mc_samples=mc_samples, generator=generator,
    ) as op:  # fmt: skip
        result = trace_estimate(op, num_hvps, method=method, generator=generator)
        result.num_hvps += op.probe_hvps  # the one product hvp_method='auto' spends choosing
        return result


def slq_density(
    operator: SymmetricOperator,
    *,
    num_probes: int = 4,
    num_steps: int = 40,
    grid_size: int = 512,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> DensityResult:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``num_probes`` Gaussian probe vectors run ``num_steps`` Lanczos steps together (one batched
    product of ``num_probes`` vectors per step). Each chain's tridiagonal matrix gives Gauss
    nodes ``θ_j`` and weights ``τ_j`` (first components of its eigenvectors, squared); the
    density is ``mean over probes of Σ_j τ_j N(x; θ_j, σ²)`` on a grid spanning the nodes.
    ``sigma`` defaults to 1% of the spectral range. Reductions over the parameters and the probe draws go
    through the operator's ``space``.

    Example:
        >>> from lightning_landscape.functional import DenseOperator
        >>> a = torch.diag(torch.cat([torch.zeros(50), torch.full((50,), 10.0)]))
        >>> d = slq_density(DenseOperator(a), num_probes=2, num_steps=5)
        >>> mass_high = d.density[d.grid > 5].sum() / d.density.sum()
        >>> 0.3 < float(mass_high) < 0.7
        True
    """
    for name, value in (("num_probes", num_probes), ("num_steps", num_steps), ("grid_size", grid_size)):
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}.")
    if sigma is not None and sigma <= 0:
        raise ValueError(f"`sigma` must be > 0 or None, got {sigma}.")
    generator = make_generator(generator)
    n, dtype, device = operator.size, operator.dtype, torch.device(operator.device)
    space = getattr(operator, "space", EUCLIDEAN)
    start = space.gaussian(num_probes, n, generator, dtype, device)
    run = lanczos(operator.matmat, start, num_steps, space=space)
    steps = max(run.lengths)
    nodes = torch.full((num_probes, steps), float("nan"), dtype=torch.float64)
    weights = torch.zeros(num_probes, steps, dtype=torch.float64)
    for i, m in enumerate(run.lengths):
        theta, s = torch.linalg.eigh(run.tridiagonal(i))
        nodes[i, :m] = theta
        weights[i, :m] = s[0, :].pow(2)
    finite = nodes[torch.isfinite(nodes)]
    lo, hi = float(finite.min()), float(finite.max())
    width = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    sigma = sigma if sigma is not None else 0.01 * width
    pad = 5 * sigma
    grid = torch.linspace(lo - pad, hi + pad, grid_size, dtype=torch.float64)
    centers = torch.nan_to_num(nodes, nan=0.0)
    kernel = torch.exp(-0.5 * ((grid[None, None, :] - centers[..., None]) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi)
    )
    density = (weights[..., None] * kernel).sum(dim=1).mean(dim=0)
    return DensityResult(
        grid, density, nodes, weights, sigma, run.num_matvecs * num_probes, getattr(operator, "method", "")
    )


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Sequence[Any],
    *,
    num_probes: int = 4,
    num_steps: int = 40,
    grid_size: int = 512,
    sigma: float | None = None,
    params: ParamsArg = None,
    generator: torch.Generator | None = None,
    hvp_method: str = "auto",
    eval_mode: bool = True,
    curvature: str = "hessian",
    output_fn: OutputFn | None = None,
    output_loss: str | OutputLoss | None = None,
    mc_samples: int = 1,
) -> DensityResult:
    """Spectral density of the Hessian of the probe loss (SLQ; see :func:`slq_density`), or of its GGN or Fisher
    (``curvature``, ``output_fn``, ``output_loss``, ``mc_samples``: see :func:`hessian_trace`).

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> data = [(torch.randn(32, 4), torch.randn(32, 1))]
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> d = hessian_density(model, loss_fn, data, num_steps=10)
        >>> d.grid.shape == d.density.shape
        True
    """
    if curvature == "fisher":
        generator = make_generator(generator)
    with curvature_operator(
        model, loss_fn, batches, params, curvature=curvature, output_fn=output_fn, output_loss=output_loss,
        hvp_method=hvp_method, eval_mode=eval_mode, mc_samples=mc_samples, generator=generator,
    ) as op:  # fmt: skip
        result = slq_density(
            op, num_probes=num_probes, num_steps=num_steps, grid_size=grid_size, sigma=sigma, generator=generator
        )
        result.num_hvps += op.probe_hvps
        return result
