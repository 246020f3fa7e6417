"""The Lanczos process, with full reorthogonalization, in two forms.

- :func:`lanczos`: a batch of independent chains, one batched product per step (stochastic Lanczos
  quadrature advances its probe vectors together this way).
- :func:`block_lanczos`: one block Krylov space from a block of start vectors, one batched product of
  the block per step (the top-k eigensolver: a block of ``b`` vectors sees up to ``b`` copies of a
  repeated eigenvalue, where a single start vector sees one).

Vectors are rows: a block is ``[b, n]``. Every reduction over the parameter dimension (inner products, norms,
orthonormalization) and every random draw goes through ``space`` (:mod:`._space`), so the same code runs on
whole vectors and on FSDP2 shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._random import make_generator
from ._space import EUCLIDEAN, VectorSpace

MatVec = Callable[[Tensor], Tensor]
# stop(alpha [j+1], beta [j+1], step) -> True to stop; only called for a single chain
StopRule = Callable[[Tensor, Tensor, int], bool]
# stop(t [m, m], residual [p, m]) -> True to stop; float64 on the CPU (see `block_lanczos`). A rule may carry
# `stop.scalar(t, beta) -> bool`, the same rule for one start vector, whose residual row (0, ..., 0, beta) comes as
# the number beta (0.0: deflated, no row): the plain path then asks that form and builds no tensor per step
BlockStopRule = Callable[[Tensor, Tensor], bool]


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


def _orthogonalize(w: Tensor, basis: Tensor, upto: int, space: VectorSpace = EUCLIDEAN) -> Tensor:
    """Remove from ``w [p, n]`` its components along ``basis[:, :upto]`` (twice: classical GS²)."""
    if upto == 0:
        return w
    q = basis[:, :upto]  # [p, j, n]
    for _ in range(2):
        w = w - torch.einsum("pjn,pj->pn", q, space.inner(q, w))
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
    space: VectorSpace = EUCLIDEAN,
) -> LanczosRun:
    """Run ``p`` Lanczos chains from the rows of ``start [p, n]`` for at most ``max_steps`` matvecs.

    Each step costs one batched ``matvec`` of ``p`` vectors. A chain whose residual vanishes has
    found an invariant subspace: for a single chain the process continues from a fresh random
    vector orthogonal to the basis (so the top-k solver still sees the rest of the spectrum);
    in a batch the chain simply stops. The tridiagonal coefficients are kept in float64. Reductions over the
    parameters and the restart's random vector go through ``space`` (``n`` its local length).

    Example:
        >>> a = torch.diag(torch.tensor([4.0, 3.0, 1.0]))
        >>> run = lanczos(lambda v: v @ a, torch.ones(1, 3), 3)
        >>> torch.linalg.eigvalsh(run.tridiagonal(0)).round(decimals=4).tolist()
        [1.0, 3.0, 4.0]
    """
    p, n = start.shape
    max_steps = min(max_steps, space.dimension(n))
    if generator is None and space.distributed:  # every process must draw the same restart vector
        generator = make_generator(None)
    dtype, device = start.dtype, start.device
    keep = reorthogonalize  # the stored basis serves reorthogonalization and the eigenvectors
    basis = torch.zeros(p, max_steps, n, dtype=dtype, device=device) if keep else None
    alpha = torch.zeros(p, max_steps, dtype=torch.float64)
    beta = torch.zeros(p, max_steps, dtype=torch.float64)
    q = start / space.norms(start)[:, None].clamp_min(torch.finfo(dtype).tiny)
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
        a = space.row_dots(w, q)[:, None]
        w = w - a * q - b_prev * q_prev
        if reorthogonalize:
            w = _orthogonalize(w, basis, j + 1, space)
        b = space.norms(w)[:, None]
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
            fresh = space.gaussian(1, n, generator, dtype, device)  # (the global RNG when no generator is given)
            fresh = _orthogonalize(fresh, basis, j + 1, space) if keep else fresh
            beta[0, j] = 0.0
            b = torch.zeros_like(b)
            w = fresh / space.norm(fresh)
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


@dataclass
class BlockLanczosRun:
    """A block Lanczos run: ``tridiagonal = basis · H · basisᵀ`` (block tridiagonal, float64, CPU).

    For a Ritz pair ``(θ, s)`` of ``tridiagonal``, ``‖residual @ s‖`` is the norm of ``H x - θ x`` with
    ``x = sᵀ basis`` (up to the deflated directions, below rounding level). ``num_fresh`` counts the random
    vectors that replaced deflated directions; ``eigh`` is ``torch.linalg.eigh(tridiagonal)`` when a caller's
    stop rule already computed it (``None`` otherwise).
    """

    tridiagonal: Tensor
    basis: Tensor
    residual: Tensor
    num_matvecs: int
    num_fresh: int = 0
    eigh: tuple[Tensor, Tensor] | None = None


def _project_out(w: Tensor, basis: Tensor, space: VectorSpace = EUCLIDEAN) -> Tensor:
    """Remove from the rows of ``w [p, n]`` their components along the orthonormal rows of ``basis [m, n]`` (CGS2)."""
    if basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = torch.addmm(w, space.inner(w, basis), basis, alpha=-1)  # w - (w·basis) basis, one operation
    return w


def _gram64(w: Tensor, space: VectorSpace = EUCLIDEAN) -> Tensor:
    """``w wᵀ`` accumulated in float64 (chunk by chunk: never a float64 copy of a large ``w``)."""
    return space.inner(w, w, dtype=torch.float64)


def _range(gram: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Singular values ``s`` above ``threshold`` (descending) and left singular vectors ``u [p, r]`` of a block
    ``W``, from its float64 Gram matrix ``W Wᵀ`` (so ``W = u diag(s) V`` with ``V`` orthonormal rows)."""
    values, u = torch.linalg.eigh(gram)
    s, u = values.clamp_min(0).sqrt().flip(0), u.flip(1)
    keep = s > threshold
    return s[keep], u[:, keep]


def _next_block(
    w: Tensor,
    s: Tensor,
    u: Tensor,
    size: int,
    basis: Tensor,
    generator: torch.Generator,
    space: VectorSpace = EUCLIDEAN,
) -> Tensor:
    """``size`` orthonormal rows orthogonal to ``basis``: first the directions ``diag(1/s) uᵀ w`` of the block ``w``
    (largest first), then fresh random directions in place of the ones deflated."""
    r = min(s.numel(), size)
    parts = [(u[:, :r] / s[:r]).T.to(w) @ w] if r else []
    if size > r:
        parts.append(space.gaussian(size - r, w.shape[1], generator, w.dtype, w.device))
    v = _project_out(torch.cat(parts), basis, space)
    q, rr = space.orthonormal_rows(v)
    sign = torch.sign(torch.diagonal(rr))  # keep each row's orientation: the coupling diag(s) uᵀ assumes it
    return q * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]


def block_lanczos(
    matvec: MatVec,
    start: Tensor,
    max_matvecs: int,
    *,
    stop: BlockStopRule | None = None,
    generator: torch.Generator | None = None,
    deflation_tol: float = 100.0,
    space: VectorSpace = EUCLIDEAN,
) -> BlockLanczosRun:
    """Block Lanczos from the rows of ``start [b, n]``, full reorthogonalization, at most ``max_matvecs`` products.

    Step ``j`` multiplies the block ``Q_j`` (one batched ``matvec`` of its rows), so ``T`` gains the diagonal
    block ``A_j = Q_j H Q_jᵀ``; the residual block ``W`` (orthogonalized against the whole basis) is split
    through its float64 Gram matrix: directions with singular value at most ``deflation_tol · eps · ‖H‖``
    are deflated (an invariant subspace, an exact multiplicity) and replaced by fresh random directions
    (from ``generator``) with zero coupling, the rest become ``Q_{j+1}`` with coupling ``B_j = diag(s) uᵀ``.
    Each step moves only ``A_j`` and the Gram matrix (``2b × b`` numbers) to the host. When the budget
    leaves room for part of a block, the last block keeps the strongest directions and the dropped ones
    count in ``residual``. ``stop(T, residual)`` is asked after every step. Reductions over the parameters, the
    orthonormalization and the fresh directions go through ``space`` (``n`` its local length).

    Example:
        >>> a = torch.diag(torch.tensor([3.0, 3.0, 2.0, 1.0, 0.5]))
        >>> run = block_lanczos(lambda v: v @ a, torch.randn(2, 5, generator=torch.Generator().manual_seed(0)), 10)
        >>> torch.linalg.eigvalsh(run.tridiagonal).flip(0)[:3].round(decimals=4).tolist(), run.num_matvecs
        ([3.0, 3.0, 2.0], 5)
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    cap = min(max_matvecs, space.dimension(start.shape[1]))
    if start.shape[0] == 1:  # plain Lanczos: the same steps with scalar bookkeeping
        return _single_lanczos(matvec, start, cap, stop, generator, deflation_tol, space)
    return _block_steps(matvec, start, cap, stop, generator, deflation_tol, space)


def _block_steps(
    matvec: MatVec,
    start: Tensor,
    cap: int,
    stop: BlockStopRule | None,
    generator: torch.Generator,
    deflation_tol: float,
    space: VectorSpace,
) -> BlockLanczosRun:
    """The steps of :func:`block_lanczos` for any block size, ``cap`` products at most."""
    b, n = start.shape
    dtype, device = start.dtype, start.device
    b = min(b, cap)
    eps = torch.finfo(dtype).eps
    basis = torch.empty(cap, n, dtype=dtype, device=device)
    t = torch.zeros(cap, cap, dtype=torch.float64)
    gram = _gram64(start, space).cpu()
    s, u = _range(gram, deflation_tol * eps * float(gram.diagonal().max().clamp_min(0).sqrt()))
    q = _next_block(start, s, u, b, basis[:0], generator, space)
    num_fresh = b - min(s.numel(), b)
    m, scale = 0, 0.0
    dropped: tuple[Tensor, Tensor, int] | None = None  # directions a budget-cut block left out: rows, coupling, at
    while True:
        lo, m = m, m + q.shape[0]
        basis[lo:m] = q
        w = matvec(q)
        a = space.inner(w, q)
        w = _project_out(w, basis[:m], space)
        if dropped is not None:  # the residual's part along them, kept apart so that the residual stays exact
            along = space.inner(w, dropped[0])
            w = w - along @ dropped[0]
        pieces = [a.double(), _gram64(w, space)] + ([along.double()] if dropped is not None else [])
        small = torch.cat(pieces, dim=1).cpu()  # the one host transfer per step
        b_j = m - lo
        a, gram = (small[:, :b_j] + small[:, :b_j].T) / 2, small[:, b_j : 2 * b_j]
        t[lo:m, lo:m] = a
        scale = max(scale, float(a.abs().sum(dim=1).max()), float(gram.diagonal().max().clamp_min(0).sqrt()))
        s, u = _range(gram, deflation_tol * eps * scale)
        coupling = s[:, None] * u.T  # B_j: W = B_jᵀ Q_{j+1} on the kept directions
        residual = torch.zeros(coupling.shape[0], m, dtype=torch.float64)
        residual[:, lo:m] = coupling
        if dropped is not None:
            extra = torch.zeros(dropped[1].shape[0], m, dtype=torch.float64)
            extra[:, dropped[2] : lo] = dropped[1]
            extra[:, lo:m] = small[:, 2 * b_j :].T
            residual = torch.cat([residual, extra])
        room = min(b, cap - m)
        if (stop is not None and stop(t[:m, :m], residual)) or room == 0:
            break
        kept = min(s.numel(), room)
        q = _next_block(w, s, u, max(room, s.numel()), basis[:m], generator, space)
        if s.numel() > room:  # the budget cuts this (then last) block: keep the strongest directions
            q, dropped = q[:room], (q[room:], coupling[room:], lo)
        num_fresh += room - kept
        t[m : m + kept, lo:m] = coupling[:kept]
        t[lo:m, m : m + kept] = coupling[:kept].T
    return BlockLanczosRun(t[:m, :m].clone(), basis[:m], residual, m, num_fresh)


def _single_lanczos(
    matvec: MatVec,
    start: Tensor,
    cap: int,
    stop: BlockStopRule | None,
    generator: torch.Generator,
    deflation_tol: float,
    space: VectorSpace,
) -> BlockLanczosRun:
    """:func:`block_lanczos` for a block of one vector (``cap`` products at most): the same recurrence, deflation,
    fresh directions and stopping rule, with the per-step bookkeeping in Python floats.

    On small models the dozens of tiny tensor operations per step of the general code cost more than the product
    itself. Here a step is the product, two projections against the basis (whose first coefficients hold
    ``α = qᵀHq``), the float64 norm ``β`` of the residual and one host transfer of ``(α, β)``; the next vector is
    the residual over ``β`` (the general code's QR of one row, which projects it twice more, to rounding).
    """
    n = start.shape[1]
    dtype, device = start.dtype, start.device
    eps = torch.finfo(dtype).eps
    basis = torch.empty(cap, n, dtype=dtype, device=device)
    t = torch.zeros(cap, cap, dtype=torch.float64)
    entries = t.view(-1)  # T's entries are written through this flat view (cheaper than 2-d indexing)
    on_cpu = device.type == "cpu"
    scalar = getattr(stop, "scalar", None)  # a rule's form taking the residual as a number

    def fresh(m: int) -> Tensor:  # a random unit direction orthogonal to the basis
        v = _project_out(space.gaussian(1, n, generator, dtype, device), basis[:m], space)
        return v / space.norm(v).clamp_min(torch.finfo(dtype).tiny)

    norm0 = space.norm(start, dtype=torch.float64)
    num_fresh = int(not bool(norm0 > 0))
    q = fresh(0) if num_fresh else start / norm0.to(dtype)  # (a zero start: a random one)
    m, scale, s = 0, 0.0, 0.0
    while True:
        basis[m : m + 1] = q
        m += 1
        done = basis[:m]
        w = matvec(done[m - 1 :])
        c = space.inner(w, done)  # [1, m]: the last entry is α
        w = torch.addmm(w, c, done, alpha=-1)
        w = torch.addmm(w, space.inner(w, done), done, alpha=-1)  # twice is enough (CGS2)
        beta = space.norm(w, dtype=torch.float64)
        if on_cpu:
            alpha, s_next = float(c[0, m - 1]), float(beta)
        else:  # the one host transfer of the step
            alpha, s_next = torch.cat([c[0, m - 1 :].double(), beta.reshape(1)]).tolist()
        at = (m - 1) * (cap + 1)  # T[m-1, m-1] in the flat view
        entries[at] = alpha
        if m > 1:  # the coupling of the step before (zero after a fresh direction)
            entries[at - 1] = entries[at - cap] = s
        s = s_next
        scale = max(scale, abs(alpha), s)
        kept = s > deflation_tol * eps * scale
        if scalar is not None:  # the rule takes the residual row (0, ..., 0, s) as the number s (0: none)
            halt = scalar(t[:m, :m], s if kept else 0.0)
        else:
            halt = stop is not None and stop(t[:m, :m], _residual_row(s, kept, m))
        if halt or m == cap:
            break
        if kept:  # the next direction: the residual over its norm, coupled by it
            q = w * (1.0 / s)
        else:  # an invariant subspace: a fresh random direction, coupling zero
            q, s = fresh(m), 0.0
            num_fresh += 1
    return BlockLanczosRun(t[:m, :m].clone(), basis[:m], _residual_row(s, kept, m), m, num_fresh)


def _residual_row(s: float, kept: bool, m: int) -> Tensor:
    """The residual block of a plain Lanczos run after ``m`` steps: the row ``(0, ..., 0, s)``, or no row once the
    last residual was deflated."""
    return torch.tensor([[0.0] * (m - 1) + [s]] if kept else [[]] * 0, dtype=torch.float64).reshape(-1, m)
