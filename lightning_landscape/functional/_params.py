"""Which parameters a measurement sees, and flat views of them.

Every algorithm in :mod:`lightning_landscape.functional` works on one flat vector
that concatenates the selected parameters in a fixed order. This module turns
parameter lists into that vector and back, without ever writing to the module.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ParamSpec", "ParamsArg", "compute_dtype", "match_parameters", "select_parameters"]


#: What ``params=`` accepts everywhere in :mod:`lightning_landscape.functional`: ``None`` (every parameter with
#: ``requires_grad``), a parameter name or glob pattern, a predicate ``(name, parameter) -> bool``, a submodule of the
#: model, or an iterable mixing parameter tensors, names, glob patterns and submodules.
ParamsArg = None | str | Tensor | nn.Module | Callable[[str, Tensor], bool] | Iterable[Tensor | str | nn.Module]


class ParamSpec:
    """Names, shapes and flat layout of the parameters a measurement covers.

    Args:
        model: the module whose parameters are measured.
        params: which of ``model``'s parameters (see :func:`select_parameters`: tensors, names, glob patterns,
            a predicate or a submodule). Defaults to every parameter with ``requires_grad``.

    Example:
        >>> spec = ParamSpec(torch.nn.Linear(3, 2))
        >>> spec.names, spec.numel
        (['weight', 'bias'], 8)
        >>> spec.unflatten(spec.flatten(spec.tensors()))["bias"].shape
        torch.Size([2])
    """

    def __init__(self, model: nn.Module, params: ParamsArg = None) -> None:
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


def match_parameters(
    named: Sequence[tuple[str, Tensor]],
    spec: Callable[[str, Tensor], bool] | Iterable[Tensor | str | nn.Module],
    *,
    model: nn.Module | None = None,
    eligible: Callable[[Tensor], bool] | None = None,
    argument: str = "params",
) -> tuple[list[bool], list[str]]:
    """The one selection rule of the package: which of ``named`` (a module's ``named_parameters()``) ``spec`` picks.

    ``spec`` is a predicate ``(name, parameter) -> bool``, or an iterable of items, each one of: a parameter name
    (exact), a glob pattern (``fnmatch``, case-sensitive: a string that is not an exact name), a parameter tensor,
    or a submodule of ``model`` (its parameters; or any module holding only ``named``'s parameters, such as a
    ``ParameterList`` of them). Names and tensors select their parameter whatever ``eligible``
    says; patterns, predicates and modules select only among the parameters ``eligible`` accepts (all by default).

    Returns ``(selected, unmatched)``: one flag per entry of ``named``, and the items (patterns as given, modules as
    ``"<module ClassName>"``) that selected nothing. A tensor that is not one of ``named``, a module that is not a
    submodule of ``model`` or an item of another type is a ``ValueError`` naming ``argument``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> match_parameters(list(net.named_parameters()), ["0.*", "1.bias", "2.*"])
        ([True, True, False, True], ['2.*'])
    """
    ok = eligible or (lambda p: True)
    if callable(spec) and not isinstance(spec, nn.Module):
        return [ok(p) and bool(spec(n, p)) for n, p in named], []
    names = [n for n, _ in named]
    index = {n: i for i, n in enumerate(names)}
    by_id = {id(p): i for i, (_, p) in enumerate(named)}
    selected = [False] * len(named)
    unmatched: list[str] = []
    for item in spec:
        if isinstance(item, str):
            if item in index:
                selected[index[item]] = True
                continue
            hits = [i for i, (n, p) in enumerate(named) if ok(p) and fnmatch.fnmatchcase(n, item)]
            if not hits:
                unmatched.append(item)
            for i in hits:
                selected[i] = True
        elif isinstance(item, nn.Module):
            # a submodule, or a container of the model's own parameters (a ParameterList built from them)
            foreign = any(id(p) not in by_id for p in item.parameters())
            if foreign and (model is None or not any(m is item for m in model.modules())):
                raise ValueError(f"`{argument}`: the {type(item).__name__} given is not a submodule of the model.")
            hits = [by_id[id(p)] for p in item.parameters() if id(p) in by_id and ok(p)]
            if not hits:
                unmatched.append(f"<module {type(item).__name__}>")
            for i in hits:
                selected[i] = True
        elif isinstance(item, Tensor) and id(item) in by_id:
            selected[by_id[id(item)]] = True
        else:
            raise ValueError(
                f"`{argument}` must hold the model's own parameters (tensors), parameter names, glob patterns or "
                f"submodules; got a {type(item).__name__}."
            )
    return selected, unmatched


def select_parameters(model: nn.Module, params: ParamsArg = None) -> list[str]:
    """Names of the parameters to measure, in the module's own order.

    Args:
        model: the module.
        params: which parameters (see :data:`ParamsArg`): ``None`` selects every parameter with ``requires_grad``;
            a string is a parameter name, or else a glob pattern (``fnmatch``, case-sensitive); a predicate
            ``(name, parameter) -> bool``; a submodule of ``model`` (its parameters); or an iterable mixing
            parameter tensors, names, patterns and submodules. Names and tensors are taken as given; patterns,
            predicates and submodules select among the parameters with ``requires_grad``.

    Raises:
        ValueError: if a tensor is not one of ``model``'s parameters, a module not one of its submodules, a pattern
            or a module selects nothing, or nothing is selected at all.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> select_parameters(net, [net[1].weight])
        ['1.weight']
        >>> select_parameters(net, "*.bias"), select_parameters(net, net[0])
        (['0.bias', '1.bias'], ['0.weight', '0.bias'])
        >>> select_parameters(net, lambda name, p: p.dim() == 2)
        ['0.weight', '1.weight']
        >>> select_parameters(net, ["0.weight", "2.*"])
        Traceback (most recent call last):
        ...
        ValueError: `params`: '2.*' is neither a parameter name nor a pattern matching one (names: '0.weight', '0.bias', '1.weight', '1.bias').
    """  # noqa: E501
    named = list(model.named_parameters())
    if params is None:
        names = [n for n, p in named if p.requires_grad]
    else:
        spec = [params] if isinstance(params, (str, Tensor, nn.Module)) else params
        if not callable(spec) and not isinstance(spec, Iterable):
            raise ValueError(f"`params` must be None, a name or pattern, a predicate, a module or an iterable of "
                             f"tensors, names, patterns and modules; got {type(params).__name__}.")  # fmt: skip
        selected, unmatched = match_parameters(named, spec, model=model, eligible=lambda p: p.requires_grad)
        if unmatched:
            shown = ", ".join(repr(n) for n, _ in named[:8]) + (", ..." if len(named) > 8 else "")
            what = unmatched[0]
            if what.startswith("<module"):
                raise ValueError(f"`params`: the submodule {what[8:-1]} has no parameter with requires_grad.")
            raise ValueError(
                f"`params`: {what!r} is neither a parameter name nor a pattern matching one "
                f"(names: {shown})."
                + (
                    ""
                    if all(p.requires_grad for _, p in named)
                    else " Patterns match only parameters with requires_grad."
                )
            )
        names = [n for (n, _), s in zip(named, selected, strict=True) if s]
    if not names:
        raise ValueError("`params`: no parameters selected (the model has none with requires_grad).")
    return names
