"""Quadratics with saddles and their exact worst-case values: shared by the sharpness tests and
``benchmarks/sharpness_saddle.py``. Spectra: ``"outliers"``, ``"uniform"`` (random between λ_min and 1) or
``"even"`` (evenly spaced)."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class Quadratic(nn.Module):
    """``gᵀ(θ − w) + ½(θ − w)ᵀA(θ − w)`` with the parameter ``θ`` starting at ``w``."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(w.clone())
        self.register_buffer("a", a.clone())
        self.register_buffer("g", g.clone())
        self.register_buffer("w", w.clone())

    def forward(self) -> torch.Tensor:
        d = self.theta - self.w
        return self.g @ d + 0.5 * d @ (self.a @ d)


def quadratic_loss(model: nn.Module, batch) -> torch.Tensor:
    return model()


def trust_region_max(a: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """``max over ‖u‖₂ ≤ ρ of gᵀu + ½uᵀAu``, dense float64: ``(μI − A)u = g`` with ``μ ≥ max(λ_max, 0)``, the
    hard case (``g`` without a component on the top eigenvector, ``‖u(λ_max)‖ < ρ``) completed along it."""
    lam, q = torch.linalg.eigh(a.double())
    gam = q.T @ g.double()
    top = lam[-1].item()
    values = [0.0]

    def value(c: torch.Tensor) -> float:
        return (gam @ c + 0.5 * (lam * c * c).sum()).item()

    if top < 0 and (gam / lam).norm().item() <= rho:
        values.append(value(-gam / lam))
    lo, hi = max(top, 0.0), max(top, 0.0) + gam.norm().item() / rho
    if gam.norm().item() > 0:
        for _ in range(300):
            mid = 0.5 * (lo + hi)
            if (gam / (mid - lam)).norm().item() > rho:
                lo = mid
            else:
                hi = mid
        values.append(value(gam / (hi - lam)))
    if top >= 0:
        rest = lam < top - 1e-9
        c = torch.zeros_like(gam)
        c[rest] = gam[rest] / (top - lam[rest])
        if c.norm().item() <= rho:
            c[-1] = (rho**2 - c.norm().item() ** 2) ** 0.5
            values.append(value(c))
    return max(values)


def box_max_diagonal(lam: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """``max over ‖u‖∞ ≤ ρ of Σ gᵢuᵢ + ½λᵢuᵢ²``, coordinate by coordinate: a convex coordinate at a vertex, a
    concave one at ``gᵢ/|λᵢ|`` when that is inside, else at the vertex."""
    total = 0.0
    for li, gi in zip(lam.tolist(), g.tolist(), strict=True):
        best = rho * abs(gi) + 0.5 * li * rho**2
        if li < 0 and abs(gi / li) <= rho:
            best = max(best, gi * gi / (2 * -li))
        total += best
    return max(total, 0.0)


def box_max_brute_force(a: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """``max over ‖u‖∞ ≤ ρ of gᵀu + ½uᵀAu`` for small ``d``: every face (each coordinate at −ρ, +ρ or free, the
    free ones stationary), the feasible ones compared. A maximizer is stationary on the face it lies in."""
    d = g.numel()
    best = 0.0
    for assign in itertools.product((-1, 0, 1), repeat=d):
        side = torch.tensor(assign, dtype=torch.float64)
        free = side == 0
        u = rho * side
        if free.any():
            try:
                u[free] = torch.linalg.solve(a[free][:, free], -(g[free] + a[free][:, ~free] @ u[~free]))
            except RuntimeError:  # singular on this face: its maximum is on a smaller face, also enumerated
                continue
            if u[free].abs().max().item() > rho * (1 + 1e-12):
                continue
        best = max(best, (g @ u + 0.5 * u @ a @ u).item())
    return best


def saddle(d: int, lam_min: float, gradient: str, rho: float, seed: int, diagonal: bool = False, spectrum="outliers"):
    """``(A, g, w)``: ``λ_max = 1``; the spectrum a Hessian at a saddle has (``"outliers"``: a few at both ends,
    ``1, 0.6, 0.35`` and ``λ_min, λ_min/2, λ_min/5``, and a bulk in [−0.05, 0.2]) or (``"uniform"``) 1, λ_min
    and the rest uniform in between; random eigenvectors (a permutation for ``diagonal``). ``gradient``:
    ``"none"`` (exactly 0: the saddle point itself), ``"small"`` (‖g‖ = 0.3ρ), ``"large"`` (‖g‖ = 3ρ) or
    ``"orthogonal"`` (‖g‖ = 0.3ρ and no component on the top eigenvector: the trust region's hard case).
    ``|w|`` in [0.5, 1.5] (the adaptive scale)."""
    gen = torch.Generator().manual_seed(seed)
    if spectrum == "outliers":
        ends = torch.tensor([1.0, 0.6, 0.35, lam_min, lam_min / 2, lam_min / 5], dtype=torch.float64)
        lam = torch.cat([ends, -0.05 + 0.25 * torch.rand(d - 6, generator=gen, dtype=torch.float64)])
    elif spectrum == "even":
        lam = torch.linspace(1.0, lam_min, d, dtype=torch.float64)
    else:
        inner = lam_min + (1 - lam_min) * torch.rand(d - 2, generator=gen, dtype=torch.float64)
        lam = torch.cat([torch.tensor([1.0, lam_min], dtype=torch.float64), inner])
    if diagonal:
        q = torch.eye(d, dtype=torch.float64)[torch.randperm(d, generator=gen)]
    else:
        q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    a = (q * lam) @ q.T
    a = 0.5 * (a + a.T)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    if gradient == "orthogonal":
        g = g - (g @ q[:, 0]) * q[:, 0]
    g = g / g.norm() * rho * {"none": 0.0, "small": 0.3, "large": 3.0, "orthogonal": 0.3}[gradient]
    w = (0.5 + torch.rand(d, generator=gen, dtype=torch.float64)) * torch.randn(d, generator=gen).sign().double()
    return a, g, w
