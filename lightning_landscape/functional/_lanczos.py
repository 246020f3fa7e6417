"""The Lanczos process on a batch of independent start vectors, with full reorthogonalization.

Shared by the top-k eigensolver (one start vector, a stopping rule) and stochastic Lanczos
quadrature (several probe vectors advanced together, one batched HVP per step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]
# stop(alpha [j+1], beta [j+1], step) -> True to stop; only called for a single chain
StopRule = Callable[[Tensor, Tensor, int], bool]


@dataclass
class LanczosRun:
    """The tridiagonal matrices of ``p`` Lanczos chains and, optionally, their bases.

    ``alpha[i, :length[i]]`` is the diagonal and ``beta[i, :length[i] - 1]`` the off-diagonal of
    chain ``i``; ``basis[i, :length[i]]`` its orthonormal Lanczos vectors (when kept).
    """

    alpha: Tensor
    beta: Tensor
    lengths: list[int]
    basis: Tensor | None
    num_matvecs: int

    def tridiagonal(self, i: int = 0) -> Tensor:
        m = self.lengths[i]
        t = torch.diag(self.alpha[i, :m])
        if m > 1:
            off = self.beta[i, : m - 1]
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        return t


def _orthogonalize(w: Tensor, basis: Tensor, upto: int) -> Tensor:
    """Remove from ``w [p, n]`` its components along ``basis[:, :upto]`` (twice: classical GS²)."""
    if upto == 0:
        return w
    q = basis[:, :upto]  # [p, j, n]
    for _ in range(2):
        w = w - torch.einsum("pjn,pj->pn", q, torch.einsum("pjn,pn->pj", q, w))
    return w


def lanczos(
    matvec: MatVec,
    start: Tensor,
    max_steps: int,
    *,
    reorthogonalize: bool = True,
    stop: StopRule | None = None,
    generator: torch.Generator | None = None,
    breakdown_tol: float = 1e-10,
) -> LanczosRun:
    """Run ``p`` Lanczos chains from the rows of ``start [p, n]`` for at most ``max_steps`` matvecs.

    Each step costs one batched ``matvec`` of ``p`` vectors. A chain whose residual vanishes has
    found an invariant subspace: for a single chain the process continues from a fresh random
    vector orthogonal to the basis (so the top-k solver still sees the rest of the spectrum);
    in a batch the chain simply stops. The tridiagonal coefficients are kept in float64.
    """
    p, n = start.shape
    max_steps = min(max_steps, n)
    dtype, device = start.dtype, start.device
    keep = reorthogonalize  # the stored basis serves reorthogonalization and the eigenvectors
    basis = torch.zeros(p, max_steps, n, dtype=dtype, device=device) if keep else None
    alpha = torch.zeros(p, max_steps, dtype=torch.float64)
    beta = torch.zeros(p, max_steps, dtype=torch.float64)
    q = start / start.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(p, 1, dtype=dtype, device=device)
    active = torch.ones(p, dtype=torch.bool)
    lengths = [0] * p
    steps = 0
    for j in range(max_steps):
        if keep:
            basis[:, j] = q
        w = matvec(q)
        steps += 1
        a = (w * q).sum(dim=1, keepdim=True)
        w = w - a * q - b_prev * q_prev
        if reorthogonalize:
            w = _orthogonalize(w, basis, j + 1)
        b = w.norm(dim=1, keepdim=True)
        alpha[:, j] = a.squeeze(1).double().cpu()
        beta[:, j] = b.squeeze(1).double().cpu()
        for i in range(p):
            if active[i]:
                lengths[i] = j + 1
        scale = alpha[:, : j + 1].abs().amax(dim=1) + beta[:, : j + 1].amax(dim=1)
        broke = beta[:, j] <= breakdown_tol * scale.clamp_min(1e-300)
        if p == 1 and stop is not None and stop(alpha[0, : j + 1], beta[0, : j + 1], j):
            break
        if p == 1 and bool(broke[0]) and j + 1 < max_steps:
            # invariant subspace: restart from a random direction orthogonal to what we have
            fresh = torch.randn(1, n, generator=generator, dtype=dtype, device=generator.device if generator else "cpu")
            fresh = _orthogonalize(fresh.to(device), basis, j + 1) if keep else fresh.to(device)
            beta[0, j] = 0.0
            b = torch.zeros_like(b)
            w = fresh / fresh.norm()
            q_prev, q, b_prev = q, w, b
            continue
        active &= ~broke
        if not bool(active.any()):
            break
        inv = torch.where(
            broke.to(device).unsqueeze(1), torch.zeros_like(b), 1.0 / b.clamp_min(torch.finfo(dtype).tiny)
        )
        q_prev, q, b_prev = q, w * inv, b
    return LanczosRun(alpha=alpha, beta=beta, lengths=lengths, basis=basis, num_matvecs=steps)
