"""The share of the gradient in the top Hessian eigenspace (Gur-Ari et al. 2018, "Gradient descent happens in a
tiny subspace"): ``‖P_k g‖² / ‖g‖²`` with ``P_k`` the projection onto the top-``k`` eigenvectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._params import ParamsArg
from ._space import EUCLIDEAN, VectorSpace
from .hvp import LossFn, LossOperator

__all__ = ["gradient_overlap", "hessian_gradient_overlap"]

# how far from orthonormal the rows may be: Lanczos eigenvectors are orthonormal to rounding; anything further off
# means the rows are not an orthonormal basis and ‖Uᵀ U g‖ is not the projection's norm
ORTHONORMAL_TOL = 1e-3


def gradient_overlap(eigenvectors: Tensor, gradient: Tensor, *, space: VectorSpace = EUCLIDEAN) -> Tensor:
    """Cumulative share of ``gradient`` in the span of the first ``i`` rows of ``eigenvectors``, for ``i = 1..k``.

    ``out[i - 1] = Σ_{j < i} (u_j · g)² / ‖g‖²`` (float64, ``[k]``): ``out[-1]`` is ``‖P_k g‖² / ‖g‖²``. The rows
    must be orthonormal (as :class:`~lightning_landscape.functional.EigenResult` gives them); a gradient of norm 0
    gives NaN. ``space``: the vector space of the rows (a sharded operator's, for local rows).

    Example:
        >>> u = torch.eye(3)[:2]                       # the first two coordinate axes
        >>> gradient_overlap(u, torch.tensor([1.0, 2.0, 2.0]))   # 1/9, then (1 + 4)/9
        tensor([0.1111, 0.5556], dtype=torch.float64)
    """
    if eigenvectors.dim() == 1:
        eigenvectors = eigenvectors.unsqueeze(0)
    if eigenvectors.dim() != 2 or gradient.dim() != 1 or eigenvectors.shape[1] != gradient.shape[0]:
        raise ValueError(
            f"`eigenvectors` must be [k, n] and `gradient` [n] with the same n, got {tuple(eigenvectors.shape)} and "
            f"{tuple(gradient.shape)}."
        )
    u = eigenvectors.to(device=gradient.device, dtype=torch.promote_types(eigenvectors.dtype, gradient.dtype))
    gram = space.inner(u, u, dtype=torch.float64)
    off = float((gram - torch.eye(len(gram), dtype=torch.float64, device=gram.device)).abs().max())
    if not off <= ORTHONORMAL_TOL:
        raise ValueError(f"`eigenvectors` must have orthonormal rows: their Gram matrix is {off:.1e} off the identity.")
    g = gradient.to(u.dtype)
    dots = space.inner(u, g, dtype=torch.float64)
    return dots.square().cumsum(0) / space.norm(g, dtype=torch.float64).square()


def hessian_gradient_overlap(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    eigenvectors: Tensor,
    *,
    params: ParamsArg = None,
    eval_mode: bool = True,
) -> Tensor:
    """:func:`gradient_overlap` of the probe loss's gradient (one gradient) with ``eigenvectors``.

    Args:
        model: any ``nn.Module``; left exactly as it was.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batches: probe batches (the same the eigenvectors were measured on, for Gur-Ari et al.'s figure).
        eigenvectors: ``[k, numel]`` orthonormal rows in the flat order of ``params`` (e.g.
            ``hessian_eigenvalues(...).eigenvectors``).
        params: the parameters the eigenvectors cover (see
            :func:`~lightning_landscape.functional._params.select_parameters`).
        eval_mode: measure in eval mode.

    Example:
        >>> from lightning_landscape.functional.hvp import hvp
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 1)
        >>> data = [(torch.randn(16, 3), torch.randn(16, 1))]
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> top = torch.linalg.eigh(hvp(model, loss_fn, data, torch.eye(4))).eigenvectors.flip(1).T  # all 4, top first
        >>> [round(x, 3) for x in hessian_gradient_overlap(model, loss_fn, data, top).tolist()]
        [0.212, 0.58, 0.912, 1.0]
    """
    with LossOperator(model, loss_fn, batches, params, eval_mode=eval_mode) as op:
        if eigenvectors.dim() != 2 or eigenvectors.shape[1] != op.size:
            raise ValueError(
                f"`eigenvectors` must be [k, {op.size}] (the selected parameters' flat length), got "
                f"{tuple(eigenvectors.shape)}."
            )
        _, gradient = op.gradient()
        return gradient_overlap(eigenvectors, gradient, space=op.space)
