"""Top-k Hessian eigenvalues by block Lanczos with full reorthogonalization and warm start."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._lanczos import BlockLanczosRun, block_lanczos
from ._operator import SymmetricOperator
from ._params import ParamsArg
from ._random import make_generator
from ._space import EUCLIDEAN, VectorSpace
from .curvature import OutputFn, OutputLoss, curvature_operator
from .hvp import LossFn

__all__ = ["WHICH", "EigenResult", "hessian_eigenvalues", "top_eigenvalues"]

#: Which end of the spectrum :func:`top_eigenvalues` finds (algebraic order: "smallest" is the most negative).
WHICH = ("largest", "smallest", "both")


@dataclass
class EigenResult:
    """k eigenpairs at one or both ends of the spectrum (see ``which``).

    Attributes:
        eigenvalues: float64 tensor. ``which="largest"``: ``[k]``, descending (largest algebraic first);
            ``"smallest"``: ``[k]``, ascending (most negative first); ``"both"``: ``[2k]``, the ``k`` largest
            descending, then the ``k`` smallest ascending (see :attr:`largest` and :attr:`smallest`).
        eigenvectors: orthonormal rows in the operator's flat parameter order, one per eigenvalue
            (pass them back as ``init`` to warm-start the next estimate, with the same ``which``).
        num_hvps: Hessian-vector products the solver used.
        converged: whether every requested eigenvalue met the tolerance.
        hvp_method: the product method that ran (see :data:`~lightning_landscape.functional.HVP_METHODS`).
        which: the end(s) of the spectrum computed.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    num_hvps: int
    converged: bool
    hvp_method: str = ""
    which: str = "largest"

    @property
    def largest(self) -> Tensor | None:
        """The largest eigenvalues, descending (``None`` for ``which="smallest"``)."""
        if self.which == "both":
            return self.eigenvalues[: len(self.eigenvalues) // 2]
        return self.eigenvalues if self.which == "largest" else None

    @property
    def smallest(self) -> Tensor | None:
        """The smallest (most negative) eigenvalues, ascending (``None`` for ``which="largest"``)."""
        if self.which == "both":
            return self.eigenvalues[len(self.eigenvalues) // 2 :]
        return self.eigenvalues if self.which == "smallest" else None


class _Negated:
    """``-A`` for a symmetric operator ``A``: its top eigenpairs are ``A``'s bottom ones, negated."""

    def __init__(self, operator: SymmetricOperator) -> None:
        self.operator = operator
        self.size, self.dtype, self.device = operator.size, operator.dtype, operator.device
        self.space = getattr(operator, "space", EUCLIDEAN)

    @property
    def method(self) -> str:
        return getattr(self.operator, "method", "")

    def matmat(self, vectors: Tensor) -> Tensor:
        return -self.operator.matmat(vectors)


def _error_bounds(theta: list[float], residuals: list[float], k: int) -> list[float]:
    """Bounds on |λ - θ| for the ``k`` largest Ritz values (``theta`` ascending, ``residuals`` alike), largest
    first: ``min(r, r² / gap)`` with the gap to the nearest other Ritz value (at least 1e-300)."""
    m = len(theta)
    out = []
    for i in range(m - 1, max(m - k, 0) - 1, -1):
        r = residuals[i]
        if m == 1:
            out.append(r)
            continue
        gap = min(abs(theta[i] - theta[j]) for j in (i - 1, i + 1) if 0 <= j < m)  # sorted: a neighbour's
        out.append(min(r, r * r / max(gap, 1e-300)))
    return out


# Block size min(k, MAX_BLOCK): a block of b vectors finds up to b copies of a repeated eigenvalue, and b = 3 keeps
# top-5 at 21 products on the trained MLP where b = k = 5 takes 30 (before block Lanczos: 16). A cluster of b equal
# Ritz values with room for one more copy in the top k restarts the solver cold with b = k.
MAX_BLOCK = 3
# A warm start row is (init rows + WARM_NOISE · random unit vector), so that a new top direction orthogonal to all of
# ``init`` is in the start block. Measured on a trap (the top eigenvector orthogonal to init = v2, k = 1, n = 2,000):
# missed in 0/100 seeds with 1.0, 7/100 with 0.5, 13/100 with 0.3; warm top-1/3/5 on the digits MLP 5 steps after
# init: 4-5/12-18/18 products with 1.0, 3-4/12-18/15-18 with 0.5 (cold: 9/21/21).
WARM_NOISE = 1.0


def _start_block(
    init: Tensor | None,
    b: int,
    n: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    space: VectorSpace = EUCLIDEAN,
) -> Tensor:
    """``b`` start rows. Cold: Gaussian. Warm: row ``i`` is the normalized sum of the unit rows ``i, i + b, …`` of
    ``init`` plus ``WARM_NOISE`` times a random unit vector (a row with no usable ``init`` row is random)."""
    noise = space.gaussian(b, n, generator, dtype, device)
    if init is None:
        return noise
    noise = noise / space.norms(noise)[:, None]
    rows = init.reshape(-1, n).to(device=device, dtype=dtype)
    norms = space.norms(rows)[:, None]  # not finite iff the row is not
    unit = torch.where(torch.isfinite(norms) & (norms > 0), rows / norms, torch.zeros_like(rows))
    groups = torch.arange(len(rows), device=device) % b
    folded = torch.zeros(b, n, dtype=dtype, device=device).index_add_(0, groups, unit)
    norms = space.norms(folded)[:, None]
    return torch.where(norms > 0, folded / norms + WARM_NOISE * noise, noise)


def _lanczos_top(
    operator: SymmetricOperator,
    start: Tensor,
    k: int,
    max_hvps: int,
    tol: float,
    generator: torch.Generator,
) -> tuple[BlockLanczosRun, bool, bool]:
    """One block Lanczos run with the stopping rule of :func:`top_eigenvalues`: ``(run, converged, suspect)``,
    ``suspect`` when it stopped on a converged cluster of ``b`` Ritz values that may hide another copy."""
    b = start.shape[0]
    converged = suspect = False
    previous = [math.inf] * k
    decomposition: tuple[Tensor, Tensor] | None = None  # of the last T the rule saw: the run's final one

    def stop(t: Tensor, residual: Tensor) -> bool:
        # the few numbers it decides on go to Python floats at once (the same float64 arithmetic as tensors,
        # without a tensor operation's fixed cost for each of them)
        nonlocal decomposition
        theta, s = decomposition = torch.linalg.eigh(t)
        rs = residual @ s  # one row (plain Lanczos): its magnitudes are the norms
        return decide(theta.tolist(), (rs.abs()[0] if rs.shape[0] == 1 else rs.norm(dim=0)).tolist())

    def scalar(t: Tensor, beta: float) -> bool:
        # plain Lanczos, residual row (0, ..., 0, beta): its product with s is beta times s's last row, the same
        # float64 numbers as the tensor product (the other terms are exact zeros) without building the row
        nonlocal decomposition
        theta, s = decomposition = torch.linalg.eigh(t)
        return decide(theta.tolist(), [abs(beta * x) for x in s[-1].tolist()])

    def decide(theta: list[float], residuals: list[float]) -> bool:  # theta ascending, residuals alike
        nonlocal converged, suspect, previous
        m = len(theta)
        top = theta[::-1][:k] + [math.nan] * max(k - m, 0)
        change = [math.inf if math.isnan(x - y) else abs(x - y) for x, y in zip(top, previous, strict=True)]
        previous = top
        if m < k:
            return False
        bound = _error_bounds(theta, residuals, k)
        res = residuals[::-1][:k]
        floor = tol * max(abs(x) for x in theta)
        scale = [max(abs(x), floor) for x in top]
        # the gap estimate trusts that no eigenvalue hides in a Ritz gap; the cap r <= 3·tol·|θ| keeps it honest
        # (without it: 1 in 600 cold top-2 runs on the digits MLP stopped on [λ1, λ3], and the warm trap missed 24/100)
        ok = [
            r <= tol * c or (max(e, d) <= tol * c and r <= 3 * tol * c)
            for r, e, d, c in zip(res, bound, change, scale, strict=True)
        ]
        if b < k:  # b converged values equal to tol, ending before position k: another copy may belong in the top k
            suspect = any(top[i] - top[i + b - 1] <= tol * scale[i] and all(ok[i : i + b]) for i in range(k - b))
        converged = all(ok) and not suspect
        return converged or suspect

    stop.scalar = scalar  # (block_lanczos' plain path asks this form: no residual tensor per step)
    space = getattr(operator, "space", EUCLIDEAN)
    run = block_lanczos(operator.matmat, start, max_hvps, stop=stop, generator=generator, space=space)
    if decomposition is not None and decomposition[0].shape[0] == run.num_matvecs:
        run.eigh = decomposition
    return run, converged, suspect


def top_eigenvalues(
    operator: SymmetricOperator,
    k: int = 1,
    *,
    init: Tensor | None = None,
    max_hvps: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    which: str = "largest",
) -> EigenResult:
    """Largest-``k`` (or smallest, or both) eigenpairs of a symmetric ``operator`` by block Lanczos (full
    reorthogonalization).

    The block has ``b = min(k, 3)`` vectors (plain Lanczos for ``k = 1``); each step is one batched product
    of the block and counts ``b`` products. A block of ``b`` finds up to ``b`` copies of a repeated
    eigenvalue: when ``b < k`` and ``b`` converged Ritz values agree to ``tol`` with room for another copy in
    the top ``k``, the solver restarts cold with ``b = k`` on the remaining budget.

    It stops when each of the top ``k`` Ritz values ``θ`` is within ``tol·|θ|`` of an eigenvalue by its
    residual norm ``r``, or when the gap estimate ``r²/gap`` (gap to the nearest other Ritz value) and the
    last step's change of ``θ`` are below ``tol·|θ|`` with ``r`` below ``3·tol·|θ|``; or when the next block
    would exceed ``max_hvps`` products (``converged`` is then ``False``).

    ``init`` (``[m, n]``, e.g. last run's eigenvectors) is folded into the start block (row ``i`` from rows
    ``i, i + b, …``), each row plus a random unit vector (``WARM_NOISE`` = 1): eigenvectors close to
    ``init`` converge in fewer products, and a new top direction orthogonal to all of ``init`` is still in
    the start. Its share of the start is ~1/√n, so a warm start in a very large model can still miss such a
    direction (as a cold start can miss one its random start barely touches, only more often).

    Reductions over the parameters and random draws go through the operator's ``space`` (whole vectors by
    default; the local shards of a sharded operator, whose ``eigenvectors`` and ``init`` are then local rows).

    ``which="smallest"`` runs the same solver on ``-A`` (the algebraically smallest eigenvalues, most negative
    first: negative ones say the weights sit at a saddle); ``"both"`` runs it on ``A`` and on ``-A``, ``max_hvps``
    each, and returns the ``k`` largest then the ``k`` smallest (``init``: a ``"both"`` result's eigenvectors, its
    first half for the top, the second for the bottom). The stopping rule's floor is ``tol`` times the largest
    Ritz magnitude, so the smallest eigenvalues are found to ``tol`` relative to the spectral radius: a Hessian's
    bottom end, usually a cluster of tiny eigenvalues around 0, converges slowly and to that absolute accuracy;
    read ``converged`` (``True`` only when both ends met the tolerance).

    Example:
        >>> from lightning_landscape.functional import DenseOperator
        >>> a = torch.diag(torch.tensor([5.0, 5.0, 3.0, 1.0, 0.5, 0.2]))
        >>> r = top_eigenvalues(DenseOperator(a), k=3)
        >>> [round(x, 4) for x in r.eigenvalues.tolist()], r.converged, r.num_hvps <= 6
        ([5.0, 5.0, 3.0], True, True)
        >>> r = top_eigenvalues(DenseOperator(torch.diag(torch.tensor([4.0, 1.0, 0.5, -2.0]))), k=1, which="both")
        >>> [round(x, 4) for x in r.eigenvalues.tolist()], [round(x, 4) for x in r.smallest.tolist()]
        ([4.0, -2.0], [-2.0])
    """
    if which not in WHICH:
        raise ValueError(f"`which` must be one of {WHICH}, got {which!r}.")
    if which == "largest":
        return _top(operator, k, init, max_hvps, tol, generator)
    generator = make_generator(generator)
    if which == "smallest":
        low = _top(_Negated(operator), k, init, max_hvps, tol, generator)
        return EigenResult(-low.eigenvalues, low.eigenvectors, low.num_hvps, low.converged, low.hvp_method, which)
    init_top = init_low = init
    if init is not None and init.dim() == 2 and init.shape[0] >= 2:
        init_top, init_low = init[: init.shape[0] // 2], init[init.shape[0] // 2 :]
    high = _top(operator, k, init_top, max_hvps, tol, generator)
    low = _top(_Negated(operator), k, init_low, max_hvps, tol, generator)
    return EigenResult(
        torch.cat([high.eigenvalues, -low.eigenvalues]),
        torch.cat([high.eigenvectors, low.eigenvectors]),
        high.num_hvps + low.num_hvps,
        high.converged and low.converged,
        high.hvp_method,
        which,
    )


def _top(
    operator: SymmetricOperator,
    k: int,
    init: Tensor | None,
    max_hvps: int,
    tol: float,
    generator: torch.Generator | None,
) -> EigenResult:
    """The largest-``k`` eigenpairs (:func:`top_eigenvalues` with ``which="largest"``)."""
    n, dtype, device = operator.size, operator.dtype, torch.device(operator.device)
    space = getattr(operator, "space", EUCLIDEAN)
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    if k > space.dimension(n):
        raise ValueError(f"`k` must be at most the number of parameters ({space.dimension(n)}), got {k}.")
    if max_hvps < k:
        raise ValueError(f"`max_hvps` must be >= k ({k}), got {max_hvps}.")
    if tol <= 0:
        raise ValueError(f"`tol` must be > 0, got {tol}.")
    generator = make_generator(generator)
    start = _start_block(init, min(k, MAX_BLOCK), n, generator, dtype, device, space)
    run, converged, suspect = _lanczos_top(operator, start, k, max_hvps, tol, generator)
    used = run.num_matvecs
    if suspect and max_hvps - used >= k:
        cold = space.gaussian(k, n, generator, dtype, device)
        second, converged, _ = _lanczos_top(operator, cold, k, max_hvps - used, tol, generator)
        used += second.num_matvecs
        # Ritz values are lower bounds of the eigenvalues in order: if neither converged, keep the larger ones
        sums = [float(torch.linalg.eigvalsh(r.tridiagonal)[-k:].sum()) for r in (run, second)]
        run = second if converged or sums[1] >= sums[0] else run
    theta, s = run.eigh or torch.linalg.eigh(run.tridiagonal)  # ascending: the top k are the last k, reversed
    top, s = theta.flip(0)[:k], s.flip(1)[:, :k]
    vectors = s.T.to(device=device, dtype=dtype) @ run.basis
    vectors = vectors / space.norms(vectors)[:, None]
    return EigenResult(top, vectors, used, converged, getattr(operator, "method", ""))


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Sequence[Any],
    k: int = 1,
    *,
    params: ParamsArg = None,
    init: Tensor | None = None,
    max_hvps: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    hvp_method: str = "auto",
    eval_mode: bool = True,
    which: str = "largest",
    curvature: str = "hessian",
    output_fn: OutputFn | None = None,
    output_loss: str | OutputLoss | None = None,
    mc_samples: int = 1,
) -> EigenResult:
    """Top-``k`` eigenvalues (largest algebraic first) of the Hessian of the probe loss, or of its GGN or Fisher.

    Args:
        model: any ``nn.Module``; left exactly as it was.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (``None`` with the split loss ``output_loss``).
        batches: probe batches; the loss is their sample-weighted mean.
        k: how many eigenvalues (at each end for ``which="both"``).
        params: parameters to differentiate: tensors, names, glob patterns, a predicate ``(name, tensor) -> bool``
            or a submodule (see :func:`~lightning_landscape.functional.select_parameters`); default: all with
            ``requires_grad``.
        init: ``[m, numel]`` vectors to warm-start from (last result's ``eigenvectors``).
        max_hvps: product budget (for each end with ``which="both"``).
        tol: relative eigenvalue error to stop at (see :func:`top_eigenvalues`).
        generator: source of the random start block (and of the Monte-Carlo Fisher's targets).
        hvp_method: see :data:`~lightning_landscape.functional.HVP_METHODS` (``curvature="hessian"``).
        eval_mode: measure in eval mode.
        which: ``"largest"``, ``"smallest"`` or ``"both"`` (see :func:`top_eigenvalues`).
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` (Monte-Carlo) or ``"empirical_fisher"`` (see
            :mod:`~lightning_landscape.functional.curvature`); all but the Hessian need the split loss.
        output_fn: ``output_fn(model, batch) -> output`` (default ``model(batch[0])``).
        output_loss: ``"cross_entropy"``, ``"mse"`` or a callable ``(output, batch) -> scalar``.
        mc_samples: targets drawn per output unit for ``curvature="fisher"``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 1)
        >>> data = [(torch.randn(16, 3), torch.randn(16, 1))]
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> r = hessian_eigenvalues(model, loss_fn, data, k=2)
        >>> r.eigenvalues.shape, r.eigenvectors.shape, r.converged
        (torch.Size([2]), torch.Size([2, 4]), True)
        >>> g = hessian_eigenvalues(model, None, data, k=2, curvature="ggn", output_loss="mse")
        >>> torch.allclose(g.eigenvalues, r.eigenvalues, rtol=1e-3)   # a linear model with MSE: GGN = Hessian
        True
    """
    if which not in WHICH:
        raise ValueError(f"`which` must be one of {WHICH}, got {which!r}.")
    if curvature == "fisher":  # one generator for the start block and the sampled targets
        generator = make_generator(generator)
    with curvature_operator(
        model, loss_fn, batches, params, curvature=curvature, output_fn=output_fn, output_loss=output_loss,
        hvp_method=hvp_method, eval_mode=eval_mode, mc_samples=mc_samples, generator=generator,
    ) as op:  # fmt: skip
        result = top_eigenvalues(op, k, init=init, max_hvps=max_hvps, tol=tol, generator=generator, which=which)
        result.num_hvps += op.probe_hvps  # what hvp_method='auto' spent choosing (0 when it was the first answer)
        return result
