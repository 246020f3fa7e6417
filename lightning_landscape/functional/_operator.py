"""The interface the algorithms see: a symmetric linear operator given by its products."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ._space import EUCLIDEAN, VectorSpace

__all__ = ["DenseOperator", "SymmetricOperator"]


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
