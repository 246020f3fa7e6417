"""The ascent step shared by SAM/ASAM training and worst-case sharpness.

``ε = ρ · c² g / ‖c g‖₂`` (ℓ2) or ``ε = ρ · c · sign(g)`` (ℓ∞), with ``c = 1`` (plain) or
``c = |w| + η`` elementwise (adaptive, Kwon et al. 2021). For ℓ2 this is the maximizer of the
first-order expansion ``gᵀε`` over ``‖ε / c‖₂ ≤ ρ``; for ℓ∞ over ``‖ε / c‖∞ ≤ ρ``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._space import EUCLIDEAN, VectorSpace

__all__ = ["NORMS", "ascent_step"]

NORMS = ("l2", "linf")


def ascent_step(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    rho: float,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    norm: str = "l2",
    space: VectorSpace = EUCLIDEAN,
    reduce_squares: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """The perturbation ``ε`` for each tensor of ``grads`` (a list, e.g. per parameter or one flat vector).

    The ℓ2 norm runs over all tensors together, in the widest of their dtypes and float32 (float64 gradients get
    a float64 norm). A zero gradient gives ``ε = 0``. No host sync. Where the tensors are local shards, the ℓ2 norm
    is reduced across processes by either of:

    - ``space``: a distributed :class:`~lightning_landscape.functional._space.VectorSpace`; the tensors are the
      parts, in order, of one local flat vector of that space;
    - ``reduce_squares``: maps the tensors' squared norms ``[len(grads)]`` to the whole vector's squared norm
      (0-dim), e.g. per-parameter shards summed over their processes.

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> ascent_step(g, None, rho=0.5)
        [tensor([0.3000, 0.4000])]
        >>> w = [torch.tensor([1.0, 0.0])]
        >>> ascent_step(g, w, rho=0.5, adaptive=True, eta=0.0)   # c = |w|: only w[0] moves
        [tensor([0.5000, 0.0000])]
        >>> ascent_step(g, None, rho=0.5, reduce_squares=lambda sq: 4 * sq.sum())  # e.g. 4 shards alike: ‖g‖ = 10
        [tensor([0.1500, 0.2000])]
    """
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
    if adaptive and weights is None:
        raise ValueError("`weights` are needed for the adaptive step.")
    grads = list(grads)
    # one fused kernel per operation over all tensors (torch._foreach_*), not one per parameter
    scales = None
    if adaptive:
        scales = torch._foreach_abs([w.detach() for w in weights])
        torch._foreach_add_(scales, eta)
    if norm == "linf":
        signs = torch._foreach_sign(grads)
        out = signs if scales is None else torch._foreach_mul(signs, scales)
        torch._foreach_mul_(out, rho)
        return list(out)
    scaled = grads if scales is None else torch._foreach_mul(grads, scales)
    # the global norm in the gradients' precision (at least float32): float64 gradients get a float64 norm
    acc = functools.reduce(torch.promote_types, {t.dtype for t in scaled}, torch.float32)
    if space.distributed:  # a vector of local shards: the norm is the space's
        flat = scaled[0] if len(scaled) == 1 else torch.cat([t.reshape(-1) for t in scaled])
        total = space.norm(flat, dtype=acc)
    else:
        norms = torch.stack(list(torch._foreach_norm(scaled, 2, dtype=acc)))
        total = torch.linalg.vector_norm(norms) if reduce_squares is None else reduce_squares(norms.square()).sqrt()
    factor = torch.where(total > 0, rho / total.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(total))
    out = list(scaled) if scales is None else torch._foreach_mul(scaled, scales)
    return _times_scalar_tensor(out, factor)


def _times_scalar_tensor(tensors: list[Tensor], factor: Tensor) -> list[Tensor]:
    """``[t * factor for t in tensors]`` (new tensors, each in its own dtype) by one fused multiply per dtype."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    out = list(tensors)
    for dtype, idx in by_dtype.items():
        for i, product in zip(idx, torch._foreach_mul([tensors[i] for i in idx], factor.to(dtype)), strict=True):
            out[i] = product
    return out
