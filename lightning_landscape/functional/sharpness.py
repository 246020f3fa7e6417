"""Sharpness of the loss around the current weights: worst-case, average-case and Keskar's ε-sharpness.

With ``L`` the (sample-weighted mean) loss over the probe batches, ``w`` the measured
parameters, ``d`` their count and ``c`` a per-parameter scale — ``c = 1`` (plain) or
``c = |w| + η`` elementwise (adaptive, as in ASAM, Kwon et al. 2021):

- **worst case**: ``max over ‖δ / c‖_p ≤ ρ of L(w + δ) − L(w)``, ``p = 2`` (``norm="l2"``) or
  ``p = ∞`` (``norm="linf"``): the largest loss seen at a feasible point, never negative (``δ = 0`` is
  feasible). ℓ2: a Krylov space of secants from the gradient (plus a little of a random direction) and the
  exact trust-region maximizer of the quadratic model it gives, then, where the loss is not quadratic at the
  scale ρ, a monotone ascent; ℓ∞: an ascent on a separable model whose curvatures are gradient secants. Both
  start from SAM's ε and are exact on quadratics within reach (see :func:`sharpness`), saddles included.
- **average case**: ``E[L(w + c ⊙ z)] − L(w)`` with ``z ~ N(0, (ρ²/d) I)`` for ℓ2 (so
  ``E‖z‖² = ρ²``) or ``z`` uniform in ``[−ρ, ρ]^d`` for ℓ∞; a Monte Carlo mean over ``samples``
  antithetic pairs ``±z`` from the caller's generator.
- **keskar**: Keskar et al. (2017)'s ε-sharpness, ``100 · (max L(w + δ) − L(w)) / (1 + L(w))`` over
  the box ``|δ_i| ≤ ρ (|w_i| + 1)`` — the worst case with ``norm="linf"`` and ``c = |w| + 1``, by the
  same ascent.

Every quantity comes from :class:`~lightning_landscape.functional.LossOperator` (``loss`` and
``gradient`` at ``w + δ``), so the weights, buffers, ``.grad``, module mode and the global RNG
are never touched, and under data parallelism every loss and gradient is already the mean
over all processes' probe data. Every reduction over the parameters (norms, the Krylov basis's inner products)
and every random draw goes through the operator's ``space`` (``EUCLIDEAN`` unless it has one), so a sharded
operator's vectors of local shards take the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._params import ParamsArg
from ._perturbation import NORMS, ascent_step
from ._random import make_generator
from ._space import EUCLIDEAN, VectorSpace
from .hvp import LossFn, LossOperator

__all__ = ["KINDS", "NORMS", "SharpnessResult", "check_sharpness_args", "sharpness", "sharpness_estimate"]

#: The sharpness measures :func:`sharpness` computes.
KINDS = ("worst_case", "average_case", "keskar")

# Worst case, ℓ2: ``max over ‖u‖₂ ≤ ρ of f(u) = L(w + c ⊙ u) − L(w)``. Projected gradient ascent on the sphere
# is a power iteration: it runs to the eigenvalue of largest magnitude, at a saddle the negative one (the
# issue: 1.50e-4 found for ½ρ²λ_max = 1.25e-3 with λ_min = −50). So the gradients first span a Krylov space:
# the gradient at ρ·v_j gives the secant y_j = (∇f(ρv_j) − ∇f(0))/ρ, A·v_j on a quadratic, orthogonalized into
# the next direction (Lanczos on secants); the model VᵀAV's trust-region subproblem is solved exactly on the
# host, hard case included, and every gradient is also a loss at a feasible point (the best one is kept).
# - The chain starts from ∇f(0) (v_0: SAM's ε) with _RANDOM_MIX of a random direction mixed into v_1: the
#   random part is what finds the top eigenvector when the gradient has none of it (the hard case) or is zero
#   or float noise (an exact minimum). Measured at 20 gradients, evenly spaced λ in [−4, 1], d = 200: 3.1%
#   short of the maximum with a mix of 0.1, 3.1% with none, 9.0% with 1 (a block Krylov space on [g, r]:
#   7.4%); with g orthogonal to an isolated top eigenvalue and 5 products: 72% short with no mix, 6% with 0.1.
# - Checkpoint after half the gradients: where the model is quadratic at the scale ρ (the secants symmetric,
#   and the trapezoid rule along each segment reproducing the measured loss, to _QUADRATIC_TOL of the model's
#   range over the ball) the chain runs on to the end, a loss at the model's maximizer last (the dense
#   quadratic above: 3.1% short; stopping at half: 10.4%); otherwise (a network at a large ρ) the rest goes to
#   the monotone ascent below from the model's maximizer (a digits MLP at ρ = 2: 4.84 and 8.56 at 20 gradients,
#   untrained and trained, against 4.86 and 8.57 at 100; the chain to the end: 3.85 and 7.40).
_QUADRATIC_TOL = 1e-2
_RANDOM_MIX = 0.1
# The monotone ascent: each step is SAM's ε (``ascent_step``) at the best point so far, times a step size
# that starts at _FIRST_STEP (a step the length of the radius), grows by _GROW after a step that raised
# the loss and halves after one that did not; decided on the device without host syncs.
_FIRST_STEP = 1.0
_GROW = 1.5
# Worst case, ℓ∞ (and keskar): the first point is SAM's vertex ρ·sign(g); a coordinate's curvature is the
# secant of its gradient between two points that differ in it by more than _SECANT_MIN·ρ (from 0 to the
# vertex first: exact for a diagonal Hessian); each step moves toward the maximizer of the separable model
# those curvatures give over the box, from the best point so far: a concave coordinate to its model maximum
# (inside the box when its gradient is small, where sign steps cannot stop), a convex one to the better
# vertex; the step halves after a step that did not raise the loss and is whole again after one that did
# (a trained digits MLP, keskar at ρ = 5e-3: 1.200 at 20 gradients, 1.201 at 100; growing by 1.5: 1.148).
# Exact in two gradients for a diagonal Hessian, whatever the signs; otherwise a local maximum (maximizing a
# quadratic over a box is NP-hard).
_SECANT_MIN = 1e-3


@dataclass
class SharpnessResult:
    """One sharpness measurement.

    Attributes:
        value: the sharpness (for ``keskar`` already scaled by ``100 / (1 + L(w))``).
        loss: ``L(w)``, the probe loss at the current weights.
        perturbed_loss: the largest loss seen (worst case, keskar; at least ``loss``) or the
            mean perturbed loss (average case).
        kind: one of :data:`KINDS`.
        norm: ``"l2"`` or ``"linf"``.
        adaptive: whether the scale was ``c = |w| + η``.
        num_gradients: gradient evaluations over the probe set.
        num_losses: loss-only evaluations over the probe set.
    """

    value: float
    loss: float
    perturbed_loss: float
    kind: str
    norm: str
    adaptive: bool
    num_gradients: int
    num_losses: int

    @property
    def tag(self) -> str:
        """``<kind>_<norm>[_adaptive]``, the name the callback logs it under."""
        return f"{self.kind}_{self.norm}" + ("_adaptive" if self.adaptive else "")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sharpness_args(
    rho: float,
    kind: str,
    norm: str | None,
    adaptive: bool,
    eta: float,
    steps: int,
    samples: int,
) -> str:
    """Validate the arguments of :func:`sharpness` and return the norm to use.

    ``norm=None`` means ``"linf"`` for ``keskar`` (its box) and ``"l2"`` otherwise.

    Raises:
        ValueError: naming the bad argument and the accepted values.

    Example:
        >>> check_sharpness_args(0.05, "keskar", None, False, 0.01, 20, 20)
        'linf'
        >>> check_sharpness_args(0.0, "worst_case", "l2", False, 0.01, 20, 20)
        Traceback (most recent call last):
        ...
        ValueError: `rho` must be a finite number > 0, got 0.0.
    """
    if not _is_number(rho) or rho <= 0:
        raise ValueError(f"`rho` must be a finite number > 0, got {rho!r}.")
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    if norm is None:
        norm = "linf" if kind == "keskar" else "l2"
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS} (or None), got {norm!r}.")
    if kind == "keskar" and norm != "linf":
        raise ValueError(f"`norm` must be 'linf' (or None) for kind='keskar', whose set is a box; got {norm!r}.")
    if not isinstance(adaptive, bool):
        raise ValueError(f"`adaptive` must be True or False, got {adaptive!r}.")
    if kind == "keskar" and adaptive:
        raise ValueError("`adaptive` must be False for kind='keskar': its box is already scaled by |w| + 1.")
    if not _is_number(eta) or eta < 0:
        raise ValueError(f"`eta` must be a finite number >= 0, got {eta!r}.")
    for name, value in (("steps", steps), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return norm


def _project(delta: Tensor, scale: Tensor | None, rho: float, norm: str, space: VectorSpace = EUCLIDEAN) -> Tensor:
    """The point of ``{δ : ‖δ / c‖_p ≤ ρ}`` nearest ``δ`` in the ``δ / c`` coordinates."""
    if norm == "linf":
        if scale is None:
            return delta.clamp(-rho, rho)
        return torch.maximum(torch.minimum(delta, rho * scale), -rho * scale)
    u = delta if scale is None else torch.where(scale > 0, delta / scale, torch.zeros_like(delta))
    size = space.norm(u, dtype=torch.promote_types(u.dtype, torch.float32))
    factor = (rho / size.clamp_min(1e-300)).clamp(max=1.0)
    return delta * factor.to(delta.dtype)


def _unit(v: Tensor, space: VectorSpace = EUCLIDEAN) -> Tensor:
    """``v / ‖v‖``, or zeros for a zero ``v``."""
    size = space.norm(v)
    return torch.where(size > 0, v / size.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(v))


class _Best:
    """The best point seen (loss in float64, the point, its gradient), kept on the device without syncs."""

    def __init__(self, value: Tensor, point: Tensor, grad: Tensor) -> None:
        self.value, self.point, self.grad = value.double(), point, grad

    def update(self, value: Tensor, point: Tensor, grad: Tensor | None = None) -> Tensor:
        up = value.double() > self.value
        self.value = torch.where(up, value.double(), self.value)
        self.point = torch.where(up, point, self.point)
        if grad is not None:
            self.grad = torch.where(up, grad, self.grad)
        return up


class _Scaled:
    """The ``u`` coordinates of the worst case, ``δ = c ⊙ u``: ``f(u) = L(w + c ⊙ u) − L(w)``, ``∇f = c ⊙ ∇L``;
    ``vectors`` is the operator's vector space."""

    def __init__(self, op: LossOperator, scale: Tensor | None, dtype: torch.dtype) -> None:
        self.op, self.scale, self.dtype = op, scale, dtype
        self.vectors: VectorSpace = getattr(op, "space", EUCLIDEAN)

    def delta(self, u: Tensor) -> Tensor:
        return u if self.scale is None else self.scale * u

    def grad(self, g: Tensor) -> Tensor:
        g = g.to(self.dtype)
        return g if self.scale is None else self.scale * g


def _worst_case(
    op: LossOperator, rho: float, norm: str, adaptive: bool, eta: float, steps: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Returns ``(L(w), max(L(w), the largest loss seen))`` as 0-dim float64 tensors."""
    w = op.parameter_vector()
    dtype = torch.promote_types(op.dtype, torch.float32)  # the basis and model never in half precision
    scale = (w.abs() + eta).to(dtype) if adaptive else None
    vs: VectorSpace = getattr(op, "space", EUCLIDEAN)
    # Random directions for where the gradient says nothing (an exact minimum, a parameter the loss does not
    # depend on at w) and, for ℓ2, the Krylov basis's second start. Always drawn: the generator advances the
    # same way every time.
    if norm == "l2":
        fallback = vs.gaussian(1, op.size, generator, op.dtype, op.device)[0]
        second = vs.gaussian(1, op.size, generator, dtype, op.device)[0]
    else:
        fallback = vs.rademacher(1, op.size, generator, op.dtype, op.device)[0]
    base, grad = op.gradient()
    base = base.double()
    if norm == "l2":
        start = torch.where(vs.max_abs(grad) != 0, grad, fallback)  # (a NaN counts as nonzero, as in `grad != 0`)
    else:  # a zero entry of sign(g) would leave its coordinate at 0: a random sign instead
        start = torch.where(grad != 0, grad, fallback)
    # the first perturbation is SAM's / ASAM's ε (the same function)
    eps = ascent_step([start], [w], rho, adaptive=adaptive, eta=eta, norm=norm, space=vs)[0]
    eps = _project(eps, scale, rho, norm, vs)
    if steps == 1:
        return base, torch.maximum(op.loss(eps).double(), base)
    space = _Scaled(op, scale, dtype)
    if norm == "l2":
        mask = None if scale is None else (scale > 0).to(dtype)  # coordinates c = 0 cannot move
        first = _unit(space.grad(start), vs)
        second = second if mask is None else second * mask
        best = _l2_worst(space, rho, steps, base, space.grad(grad), eps, first, second, w, adaptive, eta)
    else:
        best = _box_worst(space, rho, steps, space.grad(grad), eps, rho * torch.sign(start).to(dtype))
    return base, torch.maximum(best, base)


# ---------------------------------------------------------------------------------------------- ℓ2
def _orthogonalize(y: Tensor, basis: Tensor, space: VectorSpace = EUCLIDEAN) -> tuple[Tensor, Tensor]:
    """``y`` minus its projection on the rows of ``basis`` (classical Gram–Schmidt, twice), and the coefficients."""
    coef = space.inner(basis, y)
    y = y - coef @ basis
    again = space.inner(basis, y)
    return y - again @ basis, coef + again


class _Krylov:
    """The Krylov phase of the ℓ2 worst case: orthonormal basis rows, secants and the losses they came with.

    Row 0 is the gradient's direction (its product is SAM's ε); row 1 the next Krylov direction with
    _RANDOM_MIX of a random one mixed in (for the hard case and a float-noise gradient); rows 2, 3, … the chain
    from row 1. Product ``j`` is the gradient at ``ρ·row j``, and its secant ``y_j = (∇f(ρv_j) − ∇f(0))/ρ``
    (``A·v_j`` on a quadratic) is orthogonalized into the next row: ``coef[i, j] = v_iᵀ y_j``. The part of
    ``y_0`` the mix leaves out (``extra``) completes the first column, ``v_iᵀ y_0`` for ``i ≥ 2``.
    """

    def __init__(self, space: _Scaled, rho: float, products: int, base: Tensor, g0: Tensor) -> None:
        op, dtype = space.op, space.dtype
        self.space, self.rho, self.base, self.g0 = space, rho, base, g0
        self.basis = torch.zeros(products + 1, op.size, dtype=dtype, device=op.device)
        self.coef = torch.zeros(products + 1, products, dtype=torch.float64, device=op.device)
        self.trapezoid = torch.zeros(products, dtype=torch.float64, device=op.device)
        self.extra, self.extra_coef = None, None
        self.tol = 1e3 * torch.finfo(dtype).eps  # a secant inside the span to this relative size adds nothing
        self.best: _Best | None = None

    def _residual(self, y: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """The unit vector along ``y`` minus its projection on the first ``rows`` rows (zeros where that is
        rounding), and the coefficients (the last one the residual's length)."""
        vs = self.space.vectors
        r, c = _orthogonalize(y, self.basis[:rows], vs)
        size = vs.norm(r)
        ok = size > self.tol * vs.norm(y)
        unit = torch.where(ok, r / size.clamp_min(torch.finfo(r.dtype).tiny), torch.zeros_like(r))
        return unit, torch.cat([c.double(), torch.where(ok, size, torch.zeros_like(size)).double().reshape(1)])

    def product(self, j: int, delta: Tensor | None = None, second: Tensor | None = None) -> None:
        """The gradient at ``ρ·v_j`` (at ``delta``, SAM's ε, for ``j = 0``; ``second``: the random direction)."""
        space, rho, basis = self.space, self.rho, self.basis
        vs = space.vectors
        delta = space.delta(rho * basis[j]) if delta is None else delta
        loss, grad = space.op.gradient(delta)
        if self.best is None:
            self.best = _Best(loss, delta, grad)
        else:
            self.best.update(loss, delta, grad)
        gj = space.grad(grad)
        # a quadratic's gradient is linear along the segment, so the trapezoid rule is exact on it
        self.trapezoid[j] = loss.double() - self.base - 0.5 * rho * vs.inner(basis[j], self.g0 + gj).double()
        y = (gj - self.g0) / rho
        if j == 0:
            krylov, _ = self._residual(y, 1)
            random, _ = self._residual(second, 1)
            basis[1] = _unit(krylov + _RANDOM_MIX * random, vs)
            self.extra, _ = self._residual(random, 2)
            c = _orthogonalize(y, torch.stack([basis[0], basis[1], self.extra]), vs)[1].double()
            self.coef[:2, 0], self.extra_coef = c[:2], c[2]
        else:
            basis[j + 1], self.coef[: j + 2, j] = self._residual(y, j + 1)
            self.coef[j + 1, 0] = self.extra_coef * vs.inner(basis[j + 1], self.extra).double()

    def model(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(VᵀAV, Vᵀ∇f(0), trapezoid residuals)`` over the first ``k`` rows ``V``, float64 on the host."""
        b = self.space.vectors.inner(self.basis[:k], self.g0).double()
        packed = torch.cat([self.coef[:k, :k].reshape(-1), b, self.trapezoid[:k]]).cpu()  # one host transfer
        return packed[: k * k].reshape(k, k), packed[k * k : k * k + k], packed[k * k + k :]


def _l2_worst(
    space: _Scaled,
    rho: float,
    steps: int,
    base: Tensor,
    g0: Tensor,
    eps: Tensor,
    first: Tensor,
    second: Tensor,
    w: Tensor,
    adaptive: bool,
    eta: float,
) -> Tensor:
    """Krylov phase and trust-region model, then (unless the model is quadratic) the monotone ascent."""
    op, vs = space.op, space.vectors
    n_all = steps - 1  # Krylov products when the model is quadratic
    n_half = max(1, n_all // 2)  # the checkpoint
    krylov = _Krylov(space, rho, n_all, base, g0)
    krylov.basis[0] = first
    krylov.product(0, eps, second)
    for j in range(1, n_half):
        krylov.product(j)
    k, model = n_half, None
    if n_half < n_all:
        model = krylov.model(n_half)  # (a host sync: the decision is the host's)
        noise = 64 * torch.finfo(space.dtype).eps * abs(float(base))  # the losses' rounding is no curvature
        if _looks_quadratic(*model, rho, noise):
            for j in range(n_half, n_all):
                krylov.product(j)
            k, model = n_all, None
    best = krylov.best
    left = steps - 1 - k  # gradients left (then one loss)
    # (with the gradient's direction alone the model's maximizer is SAM's ε again; a non-finite loss or
    # gradient on the way leaves no model: the ascent goes on from the best point)
    model = (model or krylov.model(k)) if k > 1 else None
    if model is not None and bool(torch.isfinite(model[0]).all()) and bool(torch.isfinite(model[1]).all()):
        t, b, _ = model
        c = _trust_region(0.5 * (t + t.T), b, rho).to(device=op.device, dtype=space.dtype)
        u = c @ krylov.basis[:k]
        u = u * (rho / vs.norm(u).clamp_min(torch.finfo(u.dtype).tiny)).clamp(max=1.0)
        delta = space.delta(u)
        del krylov, u
        if left == 0:
            best.update(op.loss(delta), delta)
            return best.value
        loss, grad = op.gradient(delta)
        best.update(loss, delta, grad)
        left -= 1
    else:
        del krylov
    size = torch.tensor(_FIRST_STEP, dtype=torch.float64, device=op.device)
    for i in range(left + 1):
        step = ascent_step([best.grad], [w], rho, adaptive=adaptive, eta=eta, space=vs)[0]
        delta = _project(best.point + size.to(step.dtype) * step, space.scale, rho, "l2", vs)
        if i < left:
            value, grad = op.gradient(delta)
        else:
            value, grad = op.loss(delta), None
        up = best.update(value, delta, grad)
        size = torch.where(up, size * _GROW, size / 2)
    return best.value


def _looks_quadratic(t: Tensor, b: Tensor, trapezoid: Tensor, rho: float, noise: float = 0.0) -> bool:
    """Whether the secant model is a quadratic at the scale ``rho``: symmetric, and reproducing the losses
    measured (the trapezoid rule along each segment) to ``_QUADRATIC_TOL`` of its range over the ball, plus
    ``noise`` (the losses' rounding).

    Example:
        >>> t, zero = torch.tensor([[2.0, 0.1], [0.1, -1.0]]).double(), torch.zeros(2).double()
        >>> _looks_quadratic(t, zero, zero, 0.1), _looks_quadratic(t.triu(), zero, zero, 0.1)  # asymmetric secants
        (True, False)
    """
    if not (bool(torch.isfinite(t).all()) and bool(torch.isfinite(b).all()) and bool(torch.isfinite(trapezoid).all())):
        return False
    sym = 0.5 * (t + t.T)
    span = rho * float(torch.linalg.vector_norm(b)) + 0.5 * rho**2 * float(torch.linalg.eigvalsh(sym).abs().max())
    if span <= 0:
        return True
    asymmetry = float(torch.linalg.matrix_norm(t - t.T)) * rho**2
    return max(asymmetry, float(trapezoid.abs().max()) - noise) <= _QUADRATIC_TOL * span


def _trust_region(t: Tensor, b: Tensor, rho: float) -> Tensor:
    """``argmax of bᵀc + ½cᵀtc over ‖c‖₂ ≤ rho`` for a small symmetric ``t`` (float64, on the host).

    Exact, hard case included: the best of the interior stationary point (``t`` negative definite), the
    boundary point ``(μI − t)c = b`` with ``μ > max(λ_max, 0)`` found by bisection, and the hard-case point
    (the boundary point at ``μ = λ_max`` completed along the top eigenvector).

    Example:
        >>> _trust_region(torch.diag(torch.tensor([1.0, -4.0], dtype=torch.float64)), torch.zeros(2).double(), 0.5)
        tensor([0.5000, 0.0000], dtype=torch.float64)
    """
    lam, q = torch.linalg.eigh(t)
    gam = q.T @ b
    top = float(lam[-1])
    size = float(lam.abs().max()) + float(torch.linalg.vector_norm(b)) / rho

    def value(c: Tensor) -> float:
        return float(gam @ c + 0.5 * (lam * c * c).sum())

    candidates = [torch.zeros_like(gam)]
    if top < 0:
        c = gam / -lam
        if float(torch.linalg.vector_norm(c)) <= rho:
            candidates.append(c)
    lo = max(top, 0.0)
    if float(torch.linalg.vector_norm(gam)) > 0:
        hi = lo + float(torch.linalg.vector_norm(gam)) / rho
        for _ in range(200):  # ‖(μ − λ)⁻¹γ‖ decreases in μ > λ_max: keep ‖c(hi)‖ ≤ rho < ‖c(lo)‖
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                break
            if float(torch.linalg.vector_norm(gam / (mid - lam))) > rho:
                lo = mid
            else:
                hi = mid
        candidates.append(gam / (hi - lam))
    if top >= 0:
        rest = lam < top - 1e-12 * size
        c = torch.where(rest, gam / torch.where(rest, top - lam, torch.ones_like(lam)), torch.zeros_like(gam))
        room = rho**2 - float(c @ c)
        if room > 0:
            c[-1] = math.sqrt(room) * (1.0 if float(gam[-1]) >= 0 else -1.0)
            candidates.append(c)
    return q @ max(candidates, key=value)


# ---------------------------------------------------------------------------------------------- ℓ∞
def _box_target(u: Tensor, g: Tensor, curvature: Tensor, rho: float) -> Tensor:
    """Maximizer over ``[−ρ, ρ]`` of each coordinate's model ``g·(t − u) + ½h·(t − u)²`` (``h`` its curvature)."""
    concave = curvature < 0
    inner = (u - g / torch.where(concave, curvature, -torch.ones_like(curvature))).clamp(-rho, rho)
    high = g * (rho - u) + 0.5 * curvature * (rho - u) ** 2
    low = g * (-rho - u) + 0.5 * curvature * (rho + u) ** 2
    up = torch.full_like(u, rho)  # (Python floats in torch.where would make a float32 ρ)
    vertex = torch.where(high > low, up, torch.where(low > high, -up, torch.where(u >= 0, up, -up)))
    return torch.where(concave, inner, vertex)


def _box_worst(space: _Scaled, rho: float, steps: int, g0: Tensor, eps: Tensor, u1: Tensor) -> Tensor:
    """Coordinate-secant ascent over the box from SAM's vertex ``u1`` (``eps = c ⊙ u1``)."""
    op = space.op
    loss, grad = op.gradient(eps)
    g1 = space.grad(grad)
    curvature = (g1 - g0) / u1  # u1 = ±ρ: no zero entries
    best = _Best(loss, u1, g1)
    size = torch.tensor(1.0, dtype=torch.float64, device=op.device)
    for k in range(2, steps + 1):
        target = _box_target(best.point, best.grad, curvature, rho)
        u = best.point + size.to(u1.dtype) * (target - best.point)
        if k < steps:
            value, grad = op.gradient(space.delta(u))
            gu = space.grad(grad)
            move = u - best.point
            moved = move.abs() > _SECANT_MIN * rho
            curvature = torch.where(
                moved, (gu - best.grad) / torch.where(moved, move, torch.ones_like(move)), curvature
            )
        else:
            value, gu = op.loss(space.delta(u)), None
        up = best.update(value, u, gu)
        size = torch.where(up, torch.ones_like(size), size / 2)
    return best.value


def _average_case(
    op: LossOperator, rho: float, norm: str, adaptive: bool, eta: float, samples: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Monte Carlo over antithetic pairs; returns ``(L(w), mean L(w ± c ⊙ z))`` as 0-dim tensors."""
    scale = (op.parameter_vector().abs() + eta) if adaptive else None
    vs: VectorSpace = getattr(op, "space", EUCLIDEAN)
    d = vs.dimension(op.size)
    base = op.loss()
    total = torch.zeros((), dtype=torch.float64, device=op.device)
    for _ in range(samples):
        if norm == "l2":
            z = vs.gaussian(1, op.size, generator, op.dtype, op.device)[0] * (rho / math.sqrt(d))
        else:
            z = (vs.uniform(1, op.size, generator, op.dtype, op.device)[0] * 2 - 1) * rho
        delta = z if scale is None else scale * z
        # z and −z have the same law: the pair's mean is unbiased and cancels the gradient's term
        total = total + op.loss(delta).double() + op.loss(-delta).double()
    return base.double(), total / (2 * samples)


def sharpness_estimate(
    operator: LossOperator,
    rho: float = 0.05,
    *,
    kind: str = "worst_case",
    norm: str | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
    steps: int = 20,
    samples: int = 20,
    generator: torch.Generator | None = None,
) -> SharpnessResult:
    """Sharpness of the loss an entered :class:`~lightning_landscape.functional.LossOperator` evaluates.

    The operator-level form of :func:`sharpness` (same arguments and definitions), for callers
    that measure several kinds on one operator. Cost: ``steps`` gradients and one loss
    (``worst_case``, ``keskar``) or ``2·samples + 1`` losses (``average_case``) over the probe
    set; one host synchronisation at the end (and, for the ℓ2 worst case, one or two on the way:
    the quadratic model is decided about and solved on the host).

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> loss_fn = lambda m, b: 0.5 * m(b).pow(2).mean()     # minimum at w = 0, Hessian diag(2, 0.5)
        >>> _ = torch.nn.init.zeros_(model.weight)
        >>> with LossOperator(model, loss_fn, [x]) as op:
        ...     r = sharpness_estimate(op, rho=0.1)
        >>> r.tag, round(r.value, 6)                            # ½ ρ² λ_max
        ('worst_case_l2', 0.01)
    """
    norm = check_sharpness_args(rho, kind, norm, adaptive, eta, steps, samples)
    generator = make_generator(generator)
    rho = float(rho)
    base, perturbed, num_gradients, num_losses = _estimate(
        operator, rho, kind, norm, adaptive, float(eta), steps, samples, generator
    )
    loss, perturbed_loss = base.item(), perturbed.item()
    value = perturbed_loss - loss
    if kind == "keskar":
        value = 100.0 * value / (1.0 + loss)
    return SharpnessResult(value, loss, perturbed_loss, kind, norm, adaptive, num_gradients, num_losses)


def _estimate(
    operator: LossOperator,
    rho: float,
    kind: str,
    norm: str,
    adaptive: bool,
    eta: float,
    steps: int,
    samples: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, int, int]:
    if kind == "average_case":
        base, perturbed = _average_case(operator, rho, norm, adaptive, eta, samples, generator)
        return base, perturbed, 0, 2 * samples + 1
    scale_eta, scaled = (1.0, True) if kind == "keskar" else (eta, adaptive)
    base, perturbed = _worst_case(operator, rho, norm, scaled, scale_eta, steps, generator)
    return base, perturbed, steps, 1


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    rho: float = 0.05,
    *,
    kind: str = "worst_case",
    norm: str | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
    steps: int = 20,
    samples: int = 20,
    generator: torch.Generator | None = None,
    params: ParamsArg = None,
    eval_mode: bool = True,
) -> float:
    """Sharpness of ``loss_fn`` over ``batches`` around the model's current weights.

    With ``L`` the sample-weighted mean loss over ``batches``, ``w`` the measured parameters
    (``params``, default all with ``requires_grad``), ``d`` their count, and ``c = 1``
    (``adaptive=False``) or ``c = |w| + eta`` elementwise (``adaptive=True``, ASAM's scale):

    - ``kind="worst_case"``: ``max over ‖δ / c‖_p ≤ rho of L(w + δ) − L(w)``, ``p = 2`` for
      ``norm="l2"`` and ``∞`` for ``norm="linf"``, from ``steps`` gradients and one loss. The value is the
      largest loss seen at a feasible point, so never above the maximum and never negative. In ``u = δ / c``:
      the first point is SAM's (ASAM's) ``ε`` from ``_perturbation.ascent_step`` (``rho·c²g/‖cg‖₂``, or
      ``rho·c·sign(g)`` for ℓ∞; a random direction from ``generator`` where the gradient is exactly zero).

      ℓ2: the gradients at ``rho·v_j`` span a Krylov space (Lanczos on the secants
      ``(∇f(rho·v_j) − ∇f(0))/rho``, ``A·v_j`` on a quadratic with Hessian ``A``) from the gradient's
      direction, with a tenth of a random one mixed into the second vector for when the gradient misses the
      top eigenvector or is float noise. The quadratic model on that space is maximized over the ball
      exactly (the trust-region subproblem, hard case included), on the host. After half the gradients, if the
      model reproduces the losses measured (a quadratic at the scale ``rho``), the Krylov phase runs to the
      end and the loss goes to the model's maximizer; otherwise the rest is a monotone ascent from it (SAM's
      step at the best point so far times a step size that grows ×1.5 after a success and halves after a
      failure). On a quadratic, saddle or not, this is the maximum over a Krylov space of degree about
      ``steps`` (half that away from quadratics): exact once the space holds the top eigenvector, i.e. when
      the top eigenvalue stands out of the spectrum's width (outliers, as Hessians have); with evenly spaced
      eigenvalues from λ_min to 1 it needs more steps (d = 200: within 5% at 20 steps for λ_min = −0.5, at 40
      for −4, at 60 for −50). Memory: about ``steps + 5`` vectors of the parameters' size (the basis
      and a few more); host synchronisations: two or three.

      ℓ∞: from SAM's vertex, each step moves toward the maximizer over the box of a separable quadratic model
      whose curvatures are coordinatewise gradient secants (a concave coordinate to its stationary point,
      inside the box when its gradient is small, a convex one to the better vertex), keeping the best point
      and halving the step after a failure. Exact for a diagonal Hessian, any signs; otherwise a local
      maximum, a lower bound (maximizing a quadratic over a box is NP-hard). No host synchronisation.
    - ``kind="average_case"``: ``E[L(w + c ⊙ z)] − L(w)``, ``z ~ N(0, (rho²/d) I)`` for ℓ2 (so
      ``E‖z‖² = rho²``), ``z`` uniform in ``[−rho, rho]^d`` for ℓ∞; estimated from ``samples`` draws
      of ``z`` from ``generator``, each evaluated at ``+z`` and ``−z`` (antithetic: unbiased, and it
      cancels the gradient's first-order term, which otherwise dominates the noise away from a
      minimum).
    - ``kind="keskar"``: Keskar et al. (2017)'s ε-sharpness with ε = ``rho``,
      ``100 · (max L(w + δ) − L(w)) / (1 + L(w))`` over the box ``|δ_i| ≤ rho·(|w_i| + 1)``, by the
      same ascent. ``norm`` must be ``"linf"`` or ``None`` and ``adaptive`` ``False``.

    ``norm=None`` means ``"l2"``, except ``"linf"`` for ``keskar``. Measured on the model's device
    in eval mode (unless ``eval_mode=False``) without writing weights, buffers or ``.grad``, and
    without touching the global RNG (``generator`` defaults to a fresh one seeded with 0).

    Raises:
        ValueError: ``rho <= 0``, an unknown ``kind`` or ``norm``, ``steps < 1``, ``samples < 1``,
            ``eta < 0``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(4, 1, bias=False).double()
        >>> x = torch.randn(64, 4, dtype=torch.float64)
        >>> loss_fn = lambda m, b: 0.5 * m(b).pow(2).mean()    # minimum at w = 0, Hessian A = XᵀX/n
        >>> _ = torch.nn.init.zeros_(model.weight)
        >>> top = torch.linalg.eigvalsh(x.T @ x / 64)[-1].item()
        >>> s = sharpness(model, loss_fn, [x], rho=0.1)
        >>> abs(s - 0.5 * 0.1**2 * top) / s < 1e-3
        True
        >>> saddle = lambda m, b: 0.5 * (m.weight[0, 0] ** 2 - 50 * m.weight[0, 1] ** 2)  # λ = 1, −50, 0, 0 at w = 0
        >>> round(sharpness(model, saddle, [x], rho=0.05) / (0.5 * 0.05**2), 6)  # ½ρ²λ_max, not 0: a saddle
        1.0
    """
    norm = check_sharpness_args(rho, kind, norm, adaptive, eta, steps, samples)
    with LossOperator(model, loss_fn, batches, params, eval_mode=eval_mode) as op:
        result = sharpness_estimate(
            op,
            rho,
            kind=kind,
            norm=norm,
            adaptive=adaptive,
            eta=eta,
            steps=steps,
            samples=samples,
            generator=generator,
        )
    return result.value
