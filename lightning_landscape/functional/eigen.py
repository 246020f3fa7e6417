"""Top-k Hessian eigenvalues by Lanczos with full reorthogonalization and warm start."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._lanczos import lanczos
from ._operator import SymmetricOperator
from ._random import gaussian, make_generator
from .hvp import LossFn, LossOperator

__all__ = ["EigenResult", "hessian_eigenvalues", "top_eigenvalues"]


@dataclass
class EigenResult:
    """Top-k eigenpairs, largest algebraic eigenvalue first.

    Attributes:
        eigenvalues: ``[k]`` float64 tensor, descending.
        eigenvectors: ``[k, numel]`` orthonormal rows in the operator's flat parameter order
            (pass them back as ``init`` to warm-start the next estimate).
        num_hvps: Hessian-vector products the solver used.
        converged: whether every requested eigenvalue met the tolerance.
        hvp_method: the product method that ran (see :data:`~lightning_landscape.functional.HVP_METHODS`).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    num_hvps: int
    converged: bool
    hvp_method: str = ""


def _error_estimates(theta: Tensor, residuals: Tensor) -> Tensor:
    """Bounds on |λ - θ| for each Ritz value: ``min(r, r² / gap)`` with the Ritz gap."""
    if theta.numel() == 1:
        return residuals
    diff = (theta[:, None] - theta[None, :]).abs()
    diff.fill_diagonal_(float("inf"))
    gap = diff.amin(dim=1).clamp_min(1e-300)
    return torch.minimum(residuals, residuals.pow(2) / gap)


def top_eigenvalues(
    operator: SymmetricOperator,
    k: int = 1,
    *,
    init: Tensor | None = None,
    max_hvps: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """Largest-``k`` eigenpairs of a symmetric ``operator`` by Lanczos with full reorthogonalization.

    Stops when each of the top ``k`` Ritz values ``θ`` is within ``tol·|θ|`` of an eigenvalue by
    the residual bound ``r`` (``r`` the Lanczos residual norm), or when both the gap estimate
    ``r²/gap`` (gap to the nearest other Ritz value) and the last step's change of ``θ`` are
    below ``tol·|θ|``; or after ``max_hvps`` products. ``init`` (``[m, n]``, e.g. last run's
    eigenvectors) sets the start vector to their normalized sum, so nearby eigenvectors converge in a few products.

    Example:
        >>> from lightning_landscape.functional import DenseOperator
        >>> a = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5]))
        >>> r = top_eigenvalues(DenseOperator(a), k=2)
        >>> [round(x, 4) for x in r.eigenvalues.tolist()], r.num_hvps <= 4
        ([5.0, 3.0], True)
    """
    n, dtype, device = operator.size, operator.dtype, torch.device(operator.device)
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    if k > n:
        raise ValueError(f"`k` must be at most the number of parameters ({n}), got {k}.")
    if max_hvps < k:
        raise ValueError(f"`max_hvps` must be >= k ({k}), got {max_hvps}.")
    if tol <= 0:
        raise ValueError(f"`tol` must be > 0, got {tol}.")
    generator = make_generator(generator)
    if init is not None:
        init = init.reshape(-1, n).to(device=device, dtype=dtype)
        start = init.sum(dim=0, keepdim=True)
        if not bool(torch.isfinite(start).all()) or float(start.norm()) == 0.0:
            start = gaussian((1, n), generator, dtype, device)
    else:
        start = gaussian((1, n), generator, dtype, device)

    converged = False
    previous = torch.full((k,), float("inf"), dtype=torch.float64)

    def stop(alpha: Tensor, beta: Tensor, step: int) -> bool:
        nonlocal converged, previous
        m = alpha.numel()
        t = torch.diag(alpha) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
        theta, s = torch.linalg.eigh(t)
        residuals = (beta[m - 1] * s[-1, :]).abs()
        top = torch.full((k,), float("nan"), dtype=torch.float64)
        top[: min(k, m)] = theta.flip(0)[:k]
        change = (top - previous).abs().nan_to_num(float("inf"))
        previous = top
        if m < k:
            return False
        bound, res = _error_estimates(theta, residuals)[-k:].flip(0), residuals[-k:].flip(0)
        scale = top.abs().clamp_min(tol * float(theta.abs().max()))
        converged = bool(((res <= tol * scale) | (torch.maximum(bound, change) <= tol * scale)).all())
        return converged

    run = lanczos(operator.matmat, start, max_hvps, stop=stop, generator=generator)
    t = run.tridiagonal(0)
    theta, s = torch.linalg.eigh(t)
    order = torch.argsort(theta, descending=True)[:k]
    m = run.lengths[0]
    basis = run.basis[0, :m]
    vectors = s[:, order].T.to(device=device, dtype=dtype) @ basis
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    return EigenResult(theta[order], vectors, run.num_matvecs, converged, getattr(operator, "method", ""))


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    k: int = 1,
    *,
    params: Sequence[Tensor | str] | None = None,
    init: Tensor | None = None,
    max_hvps: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    hvp_method: str = "auto",
    eval_mode: bool = True,
) -> EigenResult:
    """Top-``k`` eigenvalues (largest algebraic first) of the Hessian of the probe loss.

    Args:
        model: any ``nn.Module``; left exactly as it was.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batches: probe batches; the loss is their sample-weighted mean.
        k: how many eigenvalues.
        params: parameters to differentiate (default: all with ``requires_grad``).
        init: ``[m, numel]`` vectors to warm-start from (last result's ``eigenvectors``).
        max_hvps: product budget.
        tol: relative eigenvalue error to stop at (see :func:`top_eigenvalues`).
        generator: source of the random start vector.
        hvp_method: see :data:`~lightning_landscape.functional.HVP_METHODS`.
        eval_mode: measure in eval mode.

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 1)
        >>> data = [(torch.randn(16, 3), torch.randn(16, 1))]
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> r = hessian_eigenvalues(model, loss_fn, data, k=2)
        >>> r.eigenvalues.shape, r.eigenvectors.shape, r.converged
        (torch.Size([2]), torch.Size([2, 4]), True)
    """
    with LossOperator(model, loss_fn, batches, params, hvp_method=hvp_method, eval_mode=eval_mode) as op:
        result = top_eigenvalues(op, k, init=init, max_hvps=max_hvps, tol=tol, generator=generator)
        result.num_hvps += op.probe_hvps  # the one product hvp_method='auto' spends choosing
        return result
