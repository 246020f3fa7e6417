"""The ascent step shared by SAM/ASAM training and worst-case sharpness.

``ε = ρ · c² g / ‖c g‖₂`` (ℓ2) or ``ε = ρ · c · sign(g)`` (ℓ∞), with ``c = 1`` (plain) or
``c = |w| + η`` elementwise (adaptive, Kwon et al. 2021). For ℓ2 this is the maximizer of the
first-order expansion ``gᵀε`` over ``‖ε / c‖₂ ≤ ρ``; for ℓ∞ over ``‖ε / c‖∞ ≤ ρ``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

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
) -> list[Tensor]:
    """The perturbation ``ε`` for each tensor of ``grads`` (a list, e.g. per parameter or one flat vector).

    The ℓ2 norm runs over all tensors together. A zero gradient gives ``ε = 0``. No host sync.

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> ascent_step(g, None, rho=0.5)
        [tensor([0.3000, 0.4000])]
        >>> w = [torch.tensor([1.0, 0.0])]
        >>> ascent_step(g, w, rho=0.5, adaptive=True, eta=0.0)   # c = |w|: only w[0] moves
        [tensor([0.5000, 0.0000])]
    """
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
    if adaptive:
        if weights is None:
            raise ValueError("`weights` are needed for the adaptive step.")
        scales = [w.detach().abs() + eta for w in weights]
    else:
        scales = [None] * len(grads)
    if norm == "linf":
        return [rho * (g.sign() if c is None else c * g.sign()) for g, c in zip(grads, scales, strict=True)]
    scaled = [g if c is None else c * g for g, c in zip(grads, scales, strict=True)]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled]))
    factor = rho / total.clamp_min(torch.finfo(torch.float32).tiny)
    factor = torch.where(total > 0, factor, torch.zeros_like(factor))
    return [(s if c is None else c * s) * factor.to(s.dtype) for s, c in zip(scaled, scales, strict=True)]
