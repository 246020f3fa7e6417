"""Helpers for probe batches: their sample counts and autograd-safe copies."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["apply_to_tensors", "batch_size", "clone_if_inference", "split_batch"]


def apply_to_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a nested batch (tuples, lists, dicts), keeping its structure.

    Example:
        >>> import torch
        >>> apply_to_tensors({"x": torch.ones(2), "n": 3}, lambda t: t * 2)
        {'x': tensor([2., 2.]), 'n': 3}
    """
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: apply_to_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(apply_to_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(apply_to_tensors(v, fn) for v in batch)
    return batch


def clone_if_inference(t: Tensor) -> Tensor:
    """A normal copy of an inference-mode tensor (autograd cannot save those); other tensors as they are.

    Call it outside ``torch.inference_mode``: a clone made inside is an inference tensor again.

    Example:
        >>> import torch
        >>> with torch.inference_mode():
        ...     t = torch.ones(2)
        >>> clone_if_inference(t).is_inference()
        False
    """
    return t.clone() if t.is_inference() else t


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor (1 if it holds none).

    Example:
        >>> import torch
        >>> batch_size((torch.zeros(5, 3), torch.zeros(5)))
        5
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return 1
    for item in items:
        if isinstance(item, (Tensor, Mapping, list, tuple)):
            return batch_size(item)
    return 1


def split_batch(batch: Any, pieces: int) -> list[Any]:
    """Split a batch into at most ``pieces`` consecutive parts along the sample dimension.

    Every tensor whose leading size is the batch size is sliced; anything else is shared.

    Example:
        >>> import torch
        >>> [b[0].tolist() for b in split_batch((torch.arange(5), "meta"), 2)]
        [[0, 1, 2], [3, 4]]
    """
    n = batch_size(batch)
    step = -(-n // max(1, min(pieces, n)))  # ceil
    return [
        apply_to_tensors(batch, lambda t, s=start: t[s : s + step] if t.dim() > 0 and t.shape[0] == n else t)
        for start in range(0, n, step)
    ]


def scalar_loss(loss: object) -> Tensor:
    """``loss`` as a 0-dim tensor, or a ``ValueError`` saying what ``loss_fn`` returned instead.

    A 0-dim loss is returned as is (a reshaped view would add a node to every gradient graph).

    Example:
        >>> import torch
        >>> scalar_loss(torch.ones(1, 1)).shape
        torch.Size([])
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss_fn` must return a scalar tensor, got {shape}.")
    return loss if loss.dim() == 0 else loss.reshape(())
