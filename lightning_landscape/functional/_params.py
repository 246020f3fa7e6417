"""Which parameters a measurement sees, and flat views of them.

Every algorithm in :mod:`lightning_landscape.functional` works on one flat vector
that concatenates the selected parameters in a fixed order. This module turns
parameter lists into that vector and back, without ever writing to the module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ParamSpec", "compute_dtype", "select_parameters"]


class ParamSpec:
    """Names, shapes and flat layout of the parameters a measurement covers.

    Args:
        model: the module whose parameters are measured.
        params: a subset of ``model``'s parameters (tensors or names). Defaults to
            every parameter with ``requires_grad``.

    Example:
        >>> spec = ParamSpec(torch.nn.Linear(3, 2))
        >>> spec.names, spec.numel
        (['weight', 'bias'], 8)
        >>> spec.unflatten(spec.flatten(spec.tensors()))["bias"].shape
        torch.Size([2])
    """

    def __init__(self, model: nn.Module, params: Iterable[Tensor | str] | None = None) -> None:
        self.names = select_parameters(model, params)
        named = dict(model.named_parameters())
        self._model_params = [named[n] for n in self.names]
        self.shapes = [p.shape for p in self._model_params]
        self.sizes = [p.numel() for p in self._model_params]
        self.numel = sum(self.sizes)
        self.dtype = self._model_params[0].dtype
        self.device = self._model_params[0].device

    def parameters(self) -> list[nn.Parameter]:
        """The module's own parameter objects, in the flat order (never to be written; do not modify the list)."""
        return self._model_params

    def tensors(self) -> list[Tensor]:
        """The current parameter values, detached (views, never copies)."""
        return [p.detach() for p in self._model_params]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (optionally with a leading batch dim) into one vector."""
        tensors = [t if t.layout == torch.strided else t.to_dense() for t in tensors]  # sparse embedding gradients
        lead = tensors[0].shape[: tensors[0].dim() - len(self.shapes[0])]
        if not lead:
            return torch.cat([t.reshape(-1) for t in tensors])
        return torch.cat([t.reshape(*lead, -1) for t in tensors], dim=-1)

    def split(self, flat: Tensor) -> list[Tensor]:
        """Split a flat vector ``[..., numel]`` into per-parameter tensors ``[..., *shape]``."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.sizes, dim=-1)
        return [p.reshape(*lead, *s) for p, s in zip(parts, self.shapes, strict=False)]

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """A ``{name: tensor}`` dict from a flat vector, shaped like the parameters."""
        return dict(zip(self.names, self.split(flat), strict=False))

    def parameter_vector(self) -> Tensor:
        """The selected parameters as one detached flat vector (a copy)."""
        return self.flatten(self.tensors()).clone()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype measurements compute in for parameters of ``dtype``: float32 for half precision, else ``dtype``.

    Example:
        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def select_parameters(model: nn.Module, params: Iterable[Tensor | str] | None = None) -> list[str]:
    """Names of the parameters to measure, in the module's own order.

    Args:
        model: the module.
        params: parameter tensors or names belonging to ``model``; ``None`` selects every
            parameter with ``requires_grad``.

    Raises:
        ValueError: if a given parameter is not one of ``model``'s, or nothing is selected.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> select_parameters(net, [net[1].weight])
        ['1.weight']
    """
    named = list(model.named_parameters())
    if params is None:
        names = [n for n, p in named if p.requires_grad]
    else:
        wanted = list(params)
        by_id = {id(p): n for n, p in named}
        known = {n for n, _ in named}
        chosen = set()
        for item in wanted:
            if isinstance(item, str):
                if item not in known:
                    raise ValueError(f"`params`: {item!r} is not a parameter name of the model.")
                chosen.add(item)
            elif isinstance(item, Tensor) and id(item) in by_id:
                chosen.add(by_id[id(item)])
            else:
                raise ValueError("`params` must hold the model's own parameters (tensors or names).")
        names = [n for n, _ in named if n in chosen]
    if not names:
        raise ValueError("`params`: no parameters selected (the model has none with requires_grad).")
    return names
