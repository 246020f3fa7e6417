"""``torch.autograd.grad`` with a zero for every input the outputs do not reach, batched rows included."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["grads_or_zeros"]


def grads_or_zeros(
    outputs: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Tensor | Sequence[Tensor] | None = None,
    **kwargs: Any,
) -> list[Tensor]:
    """The gradients of ``outputs`` with respect to ``inputs``, a zero tensor (not requiring grad) for every input
    they do not depend on, also when none of them requires grad (a loss that reads none of ``inputs``).

    ``torch.autograd.grad(..., materialize_grads=True)`` is not enough: under ``is_grads_batched=True`` it gives an
    unused input an unbatched zero (the input's shape, not ``[k, *shape]``), and under ``create_graph=True`` a zero
    that requires grad, which looks like a gradient that depends on the parameters. Here a batched zero has the
    rows of ``grad_outputs``. Other keyword arguments go to :func:`torch.autograd.grad` (``allow_unused`` is set).

    Example:
        >>> a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
        >>> [g.shape for g in grads_or_zeros((a * a).sum(), [a, b], torch.ones(4), is_grads_batched=True)]
        [torch.Size([4, 2]), torch.Size([4, 3])]
        >>> grads_or_zeros(torch.tensor(1.0), [a])  # reads no input
        [tensor([0., 0.])]
    """
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    rows: tuple[int, ...] = ()
    if kwargs.get("is_grads_batched"):
        first = grad_outputs if isinstance(grad_outputs, Tensor) else grad_outputs[0]
        rows = (first.shape[0],)
    live = [i for i, o in enumerate(outs) if o.requires_grad]
    grads: Sequence[Tensor | None] = [None] * len(inputs)
    if live:
        seeds = grad_outputs
        if grad_outputs is not None and not isinstance(grad_outputs, Tensor):
            seeds = [grad_outputs[i] for i in live]
        elif isinstance(grad_outputs, Tensor) and len(outs) > 1:
            raise ValueError("`grad_outputs` must hold one tensor per output.")
        kwargs["allow_unused"] = True
        grads = torch.autograd.grad([outs[i] for i in live], inputs, seeds, **kwargs)
    return [
        torch.zeros(rows + tuple(x.shape), dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, inputs, strict=True)
    ]
