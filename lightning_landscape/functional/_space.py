"""The vector space the algorithms' flat parameter vectors live in: where reductions over parameters happen.

Lanczos, Hutch++, SLQ and the sharpness ascents never reduce over the parameter dimension themselves: every
inner product, norm, sum, max-abs, orthonormalization and random draw of parameter-sized vectors goes through
the operator's :attr:`space` (``getattr(operator, "space", EUCLIDEAN)``). Elementwise operations and products
of small matrices with blocks of vectors stay plain torch.

- :data:`EUCLIDEAN` (a :class:`VectorSpace`): this process holds whole vectors; plain torch, exactly the
  operations the algorithms used before the space existed (bitwise the same results).
- :class:`ShardedSpace`: under FSDP2 a vector is this process's rows of every parameter, flattened and
  concatenated; reductions are local computations followed by one ``all_reduce`` per call, and random vectors
  are the local rows of the same global draw on every process, whatever their number.

Vectors are rows: a vector is ``[n]``, a block ``[k, n]``, with ``n`` this process's length (``operator.size``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._random import gaussian as _gaussian
from ._random import rademacher as _rademacher

__all__ = ["EUCLIDEAN", "ShardSlice", "ShardedSpace", "VectorSpace"]

# columns at a time when a product accumulates in a wider dtype (never a float64 copy of a large block)
_CHUNK = 1 << 20


def _contract(a: Tensor, b: Tensor) -> Tensor:
    """``a`` and ``b`` contracted over their last dimension (see :meth:`VectorSpace.inner` for the shapes)."""
    if b.dim() == 1:
        return a @ b
    if b.dim() == a.dim() - 1:  # one vector of b per leading index of a
        return (a @ b.unsqueeze(-1)).squeeze(-1)
    return a @ b.mT


def _contract_as(a: Tensor, b: Tensor, dtype: torch.dtype | None) -> Tensor:
    """:func:`_contract` accumulated in ``dtype`` (``None``: the inputs'), ``_CHUNK`` columns at a time."""
    if dtype is None or (a.dtype == dtype and b.dtype == dtype):
        return _contract(a, b)
    n = a.shape[-1]
    pieces = [(lo, min(lo + _CHUNK, n)) for lo in range(0, n, _CHUNK)] or [(0, 0)]
    return sum(_contract(a[..., lo:hi].to(dtype), b[..., lo:hi].to(dtype)) for lo, hi in pieces)


class VectorSpace:
    """Euclidean space of flat parameter vectors held whole by this process (the unsharded path).

    Every method is the plain torch reduction the algorithms use; :data:`EUCLIDEAN` is the instance.
    ``inner`` contracts the last (parameter) dimension of both arguments: ``[..., p, n], [..., q, n] ->
    [..., p, q]`` (``a @ b.T`` for blocks), ``[..., p, n], [..., n] -> [..., p]`` (one vector of ``b`` per leading
    index of ``a``; ``[p, n], [n] -> [p]``), ``[n], [n] -> []``.

    Example:
        >>> a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        >>> EUCLIDEAN.inner(a, a), EUCLIDEAN.norms(a), EUCLIDEAN.norm(a[0]), EUCLIDEAN.dimension(2)
        (tensor([[25.,  3.],
                [ 3.,  1.]]), tensor([5., 1.]), tensor(5.), 2)
        >>> q, r = EUCLIDEAN.orthonormal_rows(a)
        >>> torch.allclose(r.T @ q, a), torch.allclose(q @ q.T, torch.eye(2))
        (True, True)
    """

    #: whether reductions run across processes (collectives: every process must make the same calls)
    distributed: bool = False

    def dimension(self, n: int) -> int:
        """The vectors' global length, for a local length ``n`` (here ``n`` itself)."""
        return n

    def inner(self, a: Tensor, b: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """Inner products of the rows of ``a`` and ``b``: ``[p, n], [q, n] -> [p, q]`` (``a @ b.T``), accumulated
        in ``dtype`` when given (e.g. float64 Gram matrices of float32 blocks, chunk by chunk)."""
        return _contract_as(a, b, dtype)

    def row_dots(self, a: Tensor, b: Tensor) -> Tensor:
        """Row-wise inner products ``[p, n], [p, n] -> [p]``."""
        return (a * b).sum(dim=-1)

    def norms(self, a: Tensor) -> Tensor:
        """Row norms ``[p, n] -> [p]``."""
        return a.norm(dim=-1)

    def norm(self, v: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """The 2-norm of all entries of ``v`` (a 0-dim tensor), accumulated in ``dtype`` when given."""
        return torch.linalg.vector_norm(v) if dtype is None else torch.linalg.vector_norm(v, dtype=dtype)

    def max_abs(self, v: Tensor) -> Tensor:
        """``max |v|`` over all entries (0-dim; 0 for an empty ``v``)."""
        return v.abs().amax() if v.numel() else v.new_zeros(())

    def total(self, v: Tensor) -> Tensor:
        """The sum of all entries of ``v`` (0-dim)."""
        return v.sum()

    def orthonormal_rows(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(q [p, n], r [p, p])``: orthonormal rows ``q`` and upper-triangular ``r`` with ``v = rᵀ q`` (the QR
        factorization of ``vᵀ``, ``q`` transposed; Householder, so ``q`` is orthonormal even for a rank-deficient
        ``v``, whose lost directions get arbitrary orthonormal completions)."""
        q, r = torch.linalg.qr(v.T)
        return q.T, r

    def gaussian(
        self, k: int, n: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str
    ) -> Tensor:
        """``[k, n]`` standard normal entries, one draw from ``generator`` (the global RNG when ``None``)."""
        if generator is None:
            return torch.randn(k, n, dtype=dtype).to(device)
        return _gaussian((k, n), generator, dtype, torch.device(device))

    def rademacher(
        self, k: int, n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str
    ) -> Tensor:
        """``[k, n]`` entries ±1, one draw from ``generator``."""
        return _rademacher((k, n), generator, dtype, torch.device(device))

    def uniform(
        self, k: int, n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str
    ) -> Tensor:
        """``[k, n]`` entries uniform in ``[0, 1)``, one draw from ``generator``."""
        return torch.rand(k, n, generator=generator, device=generator.device, dtype=dtype).to(device)


#: The space of whole vectors (every operator that does not say otherwise).
EUCLIDEAN = VectorSpace()


@dataclass(frozen=True)
class ShardSlice:
    """The rows of one parameter this process holds.

    Attributes:
        global_shape: the parameter's full shape (``()`` for a scalar, taken as one row).
        start: first dim-0 row held here (FSDP2 shards dim 0 with ``torch.chunk`` sizes).
        stop: one past the last row held here (``start == stop``: nothing held).
        replicated: held whole by every process (a parameter that is not sharded); counted once in sums.

    Example:
        >>> ShardSlice((5, 3), 3, 5).numel, ShardSlice((), 0, 1, replicated=True).numel
        (6, 1)
    """

    global_shape: tuple[int, ...]
    start: int
    stop: int
    replicated: bool = False

    @property
    def rows(self) -> int:
        """Rows of the full parameter (1 for a scalar)."""
        return self.global_shape[0] if self.global_shape else 1

    @property
    def row_size(self) -> int:
        """Entries per row."""
        return math.prod(self.global_shape[1:])

    @property
    def numel(self) -> int:
        """Entries held here."""
        return (self.stop - self.start) * self.row_size

    def local_rows(self, full: Tensor) -> Tensor:
        """The entries held here of a full-shape tensor, flattened (a view)."""
        return full.reshape(self.rows, self.row_size)[self.start : self.stop].reshape(-1)


def _psd_cholesky(gram: Tensor, tol: float) -> Tensor:
    """Lower-triangular ``L`` with ``gram ≈ L Lᵀ`` for a positive semidefinite ``gram`` (float64, any device,
    no host sync): a column whose pivot is at most ``tol`` times its diagonal entry (a row of the block that
    depends on the rows before it, to that precision) is zero."""
    p = gram.shape[0]
    low = torch.zeros_like(gram)
    tiny = torch.finfo(gram.dtype).tiny
    for j in range(p):
        pivot = gram[j, j] - low[j, :j].square().sum()
        ok = pivot > tol * gram[j, j].clamp_min(tiny)
        diag = torch.where(ok, pivot.clamp_min(tiny).sqrt(), torch.zeros_like(pivot))
        col = (gram[j + 1 :, j] - low[j + 1 :, :j] @ low[j, :j]) / diag.clamp_min(tiny)
        low[j + 1 :, j] = torch.where(ok, col, torch.zeros_like(col))
        low[j, j] = diag
    return low


def _pseudo_inverse_lower(low: Tensor) -> Tensor:
    """``T`` with ``T L`` the identity on the columns of ``L`` with a nonzero diagonal and zero rows where the
    diagonal is zero (``L`` as :func:`_psd_cholesky` returns: such a column is zero below the diagonal too)."""
    held = low.diagonal() > 0
    unit = torch.where(held, low.diagonal(), torch.ones_like(low.diagonal()))
    eye = torch.eye(low.shape[0], dtype=low.dtype, device=low.device)
    inv = torch.linalg.solve_triangular(low - torch.diag(low.diagonal()) + torch.diag(unit), eye, upper=False)
    return torch.where(held[:, None], inv, torch.zeros_like(inv))


class ShardedSpace(VectorSpace):
    """Vectors held as shards: this process's rows of every parameter, flattened and concatenated.

    The local layout is, in ``slices`` order, each parameter's rows ``start:stop`` of the full tensor, row-major;
    its length is :attr:`numel`. Inner products, norms, sums and max-abs are local computations followed by one
    ``all_reduce`` over ``group`` per call (entries of ``replicated`` slices count on the group's rank 0 only,
    so once overall); every process must make the same calls in the same order. Products accumulate in the
    vectors' dtype unless a wider ``dtype`` is asked for.

    Random vectors (:meth:`gaussian`, :meth:`rademacher`, :meth:`uniform`): for each row, for each slice in
    order, the parameter's full-shape values are drawn from ``generator`` and the rows held here kept. Every
    process thus holds its part of the same global vectors whatever the number of processes (one process holding
    everything draws exactly the vectors any split of it does), at the cost of drawing every parameter whole
    (one parameter's size at a time). This stream differs from :class:`VectorSpace`'s single ``[k, n]`` draw:
    sharded and unsharded runs of the same seed use different random vectors (compare them through a
    ``ShardedSpace`` on one process).

    :meth:`orthonormal_rows` is Cholesky QR twice (CholQR2) through :meth:`inner` (Gram matrices in float64). A
    row that depends on the rows before it (to ``100·eps`` of the vectors' dtype) becomes a zero row of ``q``
    with a zero diagonal entry of ``r``, so ``q`` spans the rows' span and ``v ≈ rᵀ q`` still holds.

    Example:
        >>> space = ShardedSpace([ShardSlice((2, 2), 0, 2), ShardSlice((3,), 0, 3, replicated=True)])
        >>> space.numel, space.dimension(7), space.norm(torch.ones(7))
        (7, 7, tensor(2.6458))
        >>> v = space.gaussian(2, 7, torch.Generator().manual_seed(0), torch.float64, "cpu")
        >>> q, r = space.orthonormal_rows(v)
        >>> torch.allclose(space.inner(q, q), torch.eye(2, dtype=torch.float64)), torch.allclose(r.T @ q, v)
        (True, True)
    """

    distributed = True

    def __init__(self, slices: Sequence[ShardSlice], group: Any = None, world_size: int | None = None) -> None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        self.slices = tuple(slices)
        self.group = group
        self.world_size = world_size if world_size is not None else (dist.get_world_size(group) if initialized else 1)
        self.rank = dist.get_rank(group) if initialized and self.world_size > 1 else 0
        for s in self.slices:
            if not 0 <= s.start <= s.stop <= s.rows:
                raise ValueError(f"a slice must have 0 <= start <= stop <= rows, got {s}.")
            if s.replicated and (s.start, s.stop) != (0, s.rows):
                raise ValueError(f"a replicated slice holds every row, got {s}.")
        self.numel = sum(s.numel for s in self.slices)
        self._global = sum(math.prod(s.global_shape) for s in self.slices)
        runs: list[tuple[int, int]] = []  # the entries counted in sums here, as merged [lo, hi) ranges
        offset = 0
        for s in self.slices:
            lo, offset = offset, offset + s.numel
            if lo == offset or (s.replicated and self.rank != 0):
                continue
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], offset)
            else:
                runs.append((lo, offset))
        self._runs = runs or [(0, 0)]

    def __repr__(self) -> str:
        return f"ShardedSpace(numel={self.numel}, dimension={self._global}, rank={self.rank}/{self.world_size})"

    # ------------------------------------------------------------------ reductions
    def _check(self, *tensors: Tensor) -> None:
        for t in tensors:
            if t.dim() and t.shape[-1] != self.numel:
                raise ValueError(
                    f"vectors must have {self.numel} local entries (last dimension), got {tuple(t.shape)}."
                )

    def _local(self, fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
        """``fn`` summed over the ranges of entries this process counts (a new tensor)."""
        self._check(*tensors)
        if self._runs == [(0, self.numel)]:
            return fn(*tensors)
        out = None
        for lo, hi in self._runs:
            part = fn(*(t[..., lo:hi] for t in tensors))
            out = part if out is None else out + part
        return out

    def _reduce(self, t: Tensor, op: Any = None) -> Tensor:
        if self.world_size > 1:
            t = t.contiguous()
            torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM, group=self.group)
        return t

    def dimension(self, n: int) -> int:
        """The global number of parameters (a replicated one counted once)."""
        self._check_length(n)
        return self._global

    def inner(self, a: Tensor, b: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        return self._reduce(self._local(lambda x, y: _contract_as(x, y, dtype), a, b))

    def row_dots(self, a: Tensor, b: Tensor) -> Tensor:
        return self._reduce(self._local(lambda x, y: (x * y).sum(dim=-1), a, b))

    def norms(self, a: Tensor) -> Tensor:
        return self._reduce(self._local(lambda x: (x * x).sum(dim=-1), a)).sqrt()

    def norm(self, v: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        squares = self._local(lambda x: torch.linalg.vector_norm(x, dtype=dtype).square(), v)
        return self._reduce(squares).sqrt()

    def max_abs(self, v: Tensor) -> Tensor:
        self._check(v)
        local = v.abs().amax() if v.numel() else v.new_zeros(())
        return self._reduce(local, torch.distributed.ReduceOp.MAX if self.world_size > 1 else None)

    def total(self, v: Tensor) -> Tensor:
        return self._reduce(self._local(lambda x: x.sum(), v))

    # ------------------------------------------------------------------ orthonormalization
    def orthonormal_rows(self, v: Tensor) -> tuple[Tensor, Tensor]:
        p = v.shape[0]
        if p == 0:
            return v, torch.zeros(0, 0, dtype=v.dtype, device=v.device)
        tol = (100 * torch.finfo(v.dtype).eps) ** 2  # relative squared residual of a dependent row
        q, r = v, torch.eye(p, dtype=torch.float64, device=v.device)
        for _ in range(2):
            low = _psd_cholesky(self.inner(q, q, dtype=torch.float64), tol)
            q = _pseudo_inverse_lower(low).to(v.dtype) @ q
            r = low.T @ r
        return q, r.to(v.dtype)

    # ------------------------------------------------------------------ random vectors
    def _check_length(self, n: int) -> None:
        if n != self.numel:
            raise ValueError(f"this process's vectors have {self.numel} entries, got n={n}.")

    def _draw(
        self,
        draw: Callable[[tuple[int, ...], torch.Generator, torch.dtype], Tensor],
        k: int,
        n: int,
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> Tensor:
        if generator is None:
            raise ValueError("a sharded space draws from a generator (the same on every process), got None.")
        self._check_length(n)
        out = torch.empty(k, n, dtype=dtype, device=device)
        for i in range(k):
            offset = 0
            for s in self.slices:
                full = draw(s.global_shape, generator, dtype)  # the whole parameter, on every process
                out[i, offset : offset + s.numel] = s.local_rows(full).to(device)
                offset += s.numel
        return out

    def gaussian(
        self, k: int, n: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str
    ) -> Tensor:
        """The local rows of ``k`` global standard normal vectors (the same on every process)."""
        return self._draw(_randn, k, n, generator, dtype, device)

    def rademacher(
        self, k: int, n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str
    ) -> Tensor:
        """The local rows of ``k`` global ±1 vectors (the same on every process)."""
        return self._draw(_signs, k, n, generator, dtype, device)

    def uniform(
        self, k: int, n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str
    ) -> Tensor:
        """The local rows of ``k`` global vectors uniform in ``[0, 1)`` (the same on every process)."""
        return self._draw(_rand, k, n, generator, dtype, device)


def _randn(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)


def _rand(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)


def _signs(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return _rademacher(shape, generator, dtype, generator.device)
