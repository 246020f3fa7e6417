"""The interface the algorithms see: a symmetric linear operator given by its products."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ._space import EUCLIDEAN, VectorSpace

__all__ = ["DenseOperator", "EnteredOperator", "SymmetricOperator"]


@runtime_checkable
class SymmetricOperator(Protocol):
    """What Lanczos, Hutch++ and SLQ need: ``size``, ``dtype``, ``device`` and ``matmat``.

    ``matmat(V)`` maps ``[k, size]`` to ``[k, size]`` (one product per row, batched). An operator may also have
    a ``space`` (a :class:`~lightning_landscape.functional._space.VectorSpace`) through which the algorithms take
    every inner product, norm, orthonormalization and random draw over its vectors; one without it gets
    ``EUCLIDEAN`` (whole vectors). A sharded operator's ``space`` reduces across processes, and its ``size`` is
    this process's share.
    :class:`~lightning_landscape.functional.LossOperator` is one (the Hessian of a loss);
    :class:`DenseOperator` wraps an explicit matrix for tests and small problems.
    """

    size: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, vectors: Tensor) -> Tensor: ...


class DenseOperator:
    """An explicit symmetric matrix as a :class:`SymmetricOperator`.

    Example:
        >>> op = DenseOperator(torch.diag(torch.tensor([2.0, 1.0])))
        >>> op.matmat(torch.tensor([[1.0, 1.0]]))
        tensor([[2., 1.]])
    """

    space: VectorSpace = EUCLIDEAN

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"`matrix` must be square, got shape {tuple(matrix.shape)}.")
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.method = "dense"

    def matmat(self, vectors: Tensor) -> Tensor:
        return vectors @ self.matrix


class EnteredOperator:
    """An operator that evaluates the model only within its ``with`` block (where it has set the model's mode, the
    random state and autograd up): ``is_open``, and the refusal its evaluating methods call first. A subclass keeps
    its entered contexts in ``self._ctx`` (a list, empty when closed)."""

    _ctx: list

    @property
    def is_open(self) -> bool:
        """Whether the operator is entered (within its ``with`` block), where its products are defined."""
        return bool(self._ctx)

    def _require_open(self) -> None:
        """Refuse to evaluate outside the ``with`` block: the model would run in whatever mode it is in (BatchNorm
        in train mode updating its running statistics, dropout drawing from the global generator)."""
        if not self._ctx:
            name = type(self).__name__
            raise RuntimeError(f"{name} used outside its `with` block: evaluate it inside `with {name}(...) as op:`.")
