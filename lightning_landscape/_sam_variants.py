"""The small pieces :class:`~lightning_landscape.sam.SAMMixin` composes for its variants (issue 17).

- :func:`check_every_n_steps` and :func:`is_sam_step`: SAM on every k-th optimizer step only (MosaicML Composer's
  ``interval``), counted as Lightning counts ``every_n_train_steps`` and ``log_every_n_steps``;
- :func:`check_rho` and :func:`rho_at`: ``ρ`` as a number or a schedule of the step;
- :class:`ParamSelection`: which parameters are perturbed (all, a predicate, names/globs, or the affine parameters
  of normalization layers: SAM-ON, Mueller et al. 2023);
- :func:`ascent_norm`: the norm the ascent step divides by, for logging;
- :class:`Reuse`: LookSAM's gradient reuse between SAM steps (Liu et al. 2022).

Nothing here imports Lightning.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape.functional._params import match_parameters
from lightning_landscape.functional._perturbation import _times_scalar_tensor

__all__ = [
    "ParamSelection",
    "Reuse",
    "ascent_norm",
    "check_every_n_steps",
    "check_rho",
    "is_norm_layer",
    "is_sam_step",
    "rho_at",
]


_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d, the lazy ones
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
    )
    if t is not None
)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------ every k-th step
def check_every_n_steps(value: object) -> int:
    """``value`` if it is an ``int >= 1``, else a ``ValueError`` naming ``sam_every_n_steps``.

    Example:
        >>> check_every_n_steps(5)
        5
        >>> check_every_n_steps(0)
        Traceback (most recent call last):
        ...
        ValueError: `sam_every_n_steps` must be an int >= 1 (1: every step is a SAM step), got 0.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`sam_every_n_steps` must be an int >= 1 (1: every step is a SAM step), got {value!r}.")
    return value


def is_sam_step(global_step: int, every_n_steps: int) -> bool:
    """Whether the optimizer step after ``global_step`` completed ones is a SAM step: the k-th, 2k-th, … step,
    as Lightning's ``every_n_train_steps`` and ``log_every_n_steps`` count (so with ``log_every_n_steps`` a multiple
    of k every logged step is a SAM step). Derived from the step alone, it needs no state to resume.

    Example:
        >>> [is_sam_step(s, 3) for s in range(7)]
        [False, False, True, False, False, True, False]
    """
    return (global_step + 1) % every_n_steps == 0


# ------------------------------------------------------------------------------------------ ρ
def check_rho(value: object) -> float | Callable[[int], float]:
    """A finite number ``> 0`` (as a float) or a callable, else a ``ValueError`` naming ``sam_rho``.

    Example:
        >>> check_rho(1), check_rho(lambda step: 0.05) is not None
        (1.0, True)
        >>> check_rho(-1.0)
        Traceback (most recent call last):
        ...
        ValueError: `sam_rho` must be a finite number > 0 or a callable step -> ρ, got -1.0.
    """
    if callable(value):
        return value
    if not _is_number(value) or value <= 0:
        raise ValueError(f"`sam_rho` must be a finite number > 0 or a callable step -> ρ, got {value!r}.")
    return float(value)


def rho_at(rho: float | Callable[[int], float], step: int) -> float:
    """``ρ`` at ``step`` (``global_step``): ``rho`` itself, or ``rho(step)`` checked to be a finite number ``> 0``.

    Example:
        >>> rho_at(lambda step: 0.05 * min(1.0, (step + 1) / 10), 4)
        0.025
    """
    if not callable(rho):
        return rho
    value = rho(step)
    if not _is_number(value) or value <= 0:
        raise ValueError(f"`sam_rho` returned {value!r} at step {step}: it must return a finite number > 0.")
    return float(value)


# ------------------------------------------------------------------------------------------ which parameters
def is_norm_layer(module: nn.Module) -> bool:
    """A normalization layer: torch's BatchNorm*/SyncBatchNorm/InstanceNorm*/LayerNorm/GroupNorm/RMSNorm, or any
    module whose class name ends in ``Norm`` (``LlamaRMSNorm``, ``T5LayerNorm``, apex's ``FusedLayerNorm``).

    Example:
        >>> is_norm_layer(nn.BatchNorm2d(3)), is_norm_layer(nn.LayerNorm(3)), is_norm_layer(nn.Linear(3, 3))
        (True, True, False)
    """
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _describe(spec: object) -> str:
    return getattr(spec, "__qualname__", None) or repr(spec)


class ParamSelection:
    """Which parameters of a module SAM perturbs, from a ``sam_params`` value (validated here):

    - ``None``: all;
    - a predicate ``(name, parameter) -> bool`` on the module's ``named_parameters()``;
    - a sequence of names or glob patterns (``fnmatch``, case-sensitive) on those names;
    - ``"norm"``: the parameters of normalization layers (:func:`is_norm_layer`; SAM-ON, Mueller et al. 2023).

    The choice is resolved against the module once and cached by parameter identity: again only when the module's
    parameters are replaced (e.g. FSDP2 wrapping them after ``setup``). A predicate is called at resolution only.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
        >>> ParamSelection("norm").names(net)
        ['1.weight', '1.bias']
        >>> ParamSelection(["0.*", "2.bias"]).names(net)
        ['0.weight', '0.bias', '2.bias']
        >>> ParamSelection(lambda name, p: p.dim() == 2).names(net)
        ['0.weight', '2.weight']
        >>> ParamSelection(["conv*"]).names(net)
        Traceback (most recent call last):
        ...
        ValueError: `sam_params`=['conv*'] selects none of the 6 parameters of Sequential (names: '0.weight', '0.bias', '1.weight', '1.bias', '2.weight', ...).
    """  # noqa: E501

    def __init__(self, spec: str | Sequence[str] | Callable[[str, Tensor], bool] | None) -> None:
        accepted = (
            "None (all parameters), 'norm' (normalization layers), a predicate (name, parameter) -> bool, "
            "or a non-empty sequence of parameter names / glob patterns"
        )
        if isinstance(spec, str):
            if spec != "norm":
                raise ValueError(f"`sam_params` must be {accepted}, got {spec!r} (for one pattern: [{spec!r}]).")
        elif spec is not None and not callable(spec):
            if not isinstance(spec, Iterable) or isinstance(spec, (bytes, dict)):
                raise ValueError(f"`sam_params` must be {accepted}, got {spec!r}.")
            spec = tuple(spec)
            if not spec or not all(isinstance(s, str) for s in spec):
                raise ValueError(f"`sam_params` must be {accepted}, got {spec!r}.")
        self.spec = spec
        self.unmatched: list[str] = []  # patterns that matched no name at the last resolution
        # id(parameter) -> (weak reference, selected): the resolution, valid while each reference is alive
        self._known: dict[int, tuple[weakref.ref, bool]] = {}

    @property
    def all(self) -> bool:
        """Whether every parameter is selected (``None``)."""
        return self.spec is None

    def _selects(self, module: nn.Module) -> tuple[list[tuple[str, Tensor, bool]], list[str]]:
        """``(name, parameter, selected)`` for every parameter, and the patterns that matched none."""
        named = list(module.named_parameters())
        spec = self.spec
        if spec is None:
            return [(n, p, True) for n, p in named], []
        if spec == "norm":
            norm = {id(p) for m in module.modules() if is_norm_layer(m) for p in m.parameters(recurse=False)}
            return [(n, p, id(p) in norm) for n, p in named], []
        # names, globs and predicates: the package's one selection rule (functional/_params.py)
        selected, unmatched = match_parameters(named, spec, model=module, argument="sam_params")
        return [(n, p, s) for (n, p), s in zip(named, selected, strict=True)], unmatched

    def resolve(self, module: nn.Module) -> list[str]:
        """Resolves the choice against ``module`` and returns the selected names; a ``ValueError`` if none is."""
        selects, unmatched = self._selects(module)
        chosen = [n for n, _, s in selects if s]
        if not chosen:
            names = ", ".join(repr(n) for n, _, _ in selects[:5]) + (", ..." if len(selects) > 5 else "")
            spec = self.spec if isinstance(self.spec, str) or not callable(self.spec) else _describe(self.spec)
            spec = list(spec) if isinstance(spec, tuple) else spec
            raise ValueError(
                f"`sam_params`={spec!r} selects none of the {len(selects)} parameters of "
                f"{type(module).__name__}" + (f" (names: {names})." if selects else ".")
            )
        self._known = {id(p): (weakref.ref(p), s) for _, p, s in selects}
        self.unmatched = unmatched
        return chosen

    def names(self, module: nn.Module) -> list[str]:
        """The names of the selected parameters of ``module`` (resolving it)."""
        return self.resolve(module)

    def select(self, module: nn.Module, params: list[Tensor]) -> list[Tensor]:
        """The selected ones among ``params`` (parameters of ``module``, in their order); ``params`` itself for
        ``None``. Resolves again when one of ``params`` is not known (tensors outside the module count as not
        selected)."""
        if self.spec is None:
            return params
        known = self._known
        for p in params:
            entry = known.get(id(p))
            if entry is None or entry[0]() is not p:
                self.resolve(module)
                known = self._known
                for q in params:  # optimizer tensors that are not parameters of the module: not selected
                    entry = known.get(id(q))
                    if entry is None or entry[0]() is not q:
                        known[id(q)] = (weakref.ref(q), False)
                break
        return [p for p in params if known[id(p)][1]]


# ------------------------------------------------------------------------------------------ logging
def _acc_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return functools.reduce(torch.promote_types, {t.dtype for t in tensors}, torch.float32)


def _global_norm(tensors: Sequence[Tensor], reduce_squares: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """‖tensors‖₂ over all of them (0-dim, at least float32), as :func:`ascent_step` forms it; no host sync."""
    norms = torch.stack(list(torch._foreach_norm(list(tensors), 2, dtype=_acc_dtype(tensors))))
    return torch.linalg.vector_norm(norms) if reduce_squares is None else reduce_squares(norms.square()).sqrt()


def ascent_norm(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    reduce_squares: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The norm :func:`~lightning_landscape.functional._perturbation.ascent_step` divides by: ``‖g‖₂`` (SAM) or
    ``‖Tg‖₂`` with ``T = |w| + η`` (ASAM). A 0-dim tensor, no host sync.

    Example:
        >>> float(ascent_norm([torch.tensor([3.0]), torch.tensor([4.0])], None))
        5.0
    """
    grads = list(grads)
    if adaptive:
        scales = torch._foreach_abs([w.detach() for w in weights])
        torch._foreach_add_(scales, eta)
        grads = torch._foreach_mul(grads, scales)
    return _global_norm(grads, reduce_squares)


# ------------------------------------------------------------------------------------------ LookSAM
class Reuse:
    """LookSAM's reuse of the last SAM gradient (Liu et al. 2022, Algorithm 1).

    At a SAM step, :meth:`remember` keeps ``g_v``, the component of the SAM gradient ``g_s`` orthogonal to that
    step's plain gradient ``g``: ``g_v = g_s − (g·g_s / ‖g‖²)·g``. On a plain step, :meth:`apply` adds
    ``α·‖g‖/‖g_v‖·g_v`` to the plain gradient ``g`` (nothing while no ``g_v`` is known, or where ``‖g_v‖`` is 0 or
    not finite). ``g_v`` is the state a resume needs (:meth:`state_dict`), kept by parameter name.

    Example:
        >>> w = nn.Parameter(torch.zeros(2))
        >>> reuse = Reuse()
        >>> w.grad = torch.tensor([0.0, 2.0])                 # g_s at the SAM step
        >>> reuse.remember([w], [torch.tensor([1.0, 0.0])])  # g there: g_v = (0, 2)
        >>> w.grad = torch.tensor([3.0, 0.0])                 # a plain step's g: ‖g‖ = 3
        >>> reuse.apply([w], alpha=0.5)
        >>> w.grad
        tensor([3.0000, 1.5000])
    """

    def __init__(self) -> None:
        self.g_v: dict[int, tuple[Tensor, Tensor]] = {}  # id(parameter) -> (parameter, g_v)
        self.norm: Tensor | None = None

    @property
    def ready(self) -> bool:
        """Whether a ``g_v`` is known."""
        return self.norm is not None

    def clear(self) -> None:
        self.g_v, self.norm = {}, None

    def remember(
        self,
        params: Sequence[Tensor],
        first: Sequence[Tensor],
        *,
        mean: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """``g_v`` from ``first`` (the step's plain gradients, one per parameter) and the parameters' ``.grad`` (the
        SAM gradients). ``mean`` averages a flat tensor over processes (DDP, where ``first`` differs by rank)."""
        pairs = [(p, g, p.grad) for p, g in zip(params, first, strict=True) if p.grad is not None]
        if not pairs:
            self.clear()
            return
        ps, g, gs = (list(t) for t in zip(*pairs, strict=True))
        acc = _acc_dtype(g)
        dot = torch.stack([(a * b).sum(dtype=acc) for a, b in zip(g, gs, strict=True)]).sum()
        gg = torch.stack(list(torch._foreach_norm(g, 2, dtype=acc))).square().sum()
        coef = torch.where(gg > 0, dot / gg.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(gg))
        g_v = torch._foreach_sub(gs, _times_scalar_tensor(g, coef))
        if mean is not None:
            flat = mean(torch.cat([t.reshape(-1).to(acc) for t in g_v]))
            g_v = [
                part.view_as(t).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in g_v]), g_v, strict=True)
            ]
        norm = _global_norm(g_v)
        ok = norm.isfinite()
        g_v = [torch.where(ok, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in g_v]
        self.norm = torch.where(ok, norm, torch.zeros_like(norm))
        self.g_v = {id(p): (p, t) for p, t in zip(ps, g_v, strict=True)}

    def apply(self, params: Sequence[Tensor], alpha: float) -> None:
        """Adds ``α·‖g‖/‖g_v‖·g_v`` to the ``.grad`` of ``params`` (``‖g‖`` over all of them); no host sync."""
        if self.norm is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        pairs = [(p.grad, self.g_v[id(p)][1]) for p in params if p.grad is not None and id(p) in self.g_v]
        if not pairs:
            return
        norm = self.norm
        factor = torch.where(norm > 0, alpha * _global_norm(grads) / norm.clamp_min(1e-30), torch.zeros_like(norm))
        targets, g_v = (list(t) for t in zip(*pairs, strict=True))
        torch._foreach_add_(targets, _times_scalar_tensor(g_v, factor.to(g_v[0].device)))

    def state_dict(self, names: dict[int, str]) -> dict[str, Any]:
        """``{"g_v": {name: tensor}, "norm": tensor}`` (``names``: id(parameter) -> name), or ``{}``."""
        if self.norm is None:
            return {}
        return {"g_v": {names[i]: t for i, (_, t) in self.g_v.items() if i in names}, "norm": self.norm}

    def load_state_dict(self, state: dict[str, Any], params: dict[str, Tensor]) -> None:
        """Restores :meth:`state_dict` onto ``params`` (name -> parameter), on each parameter's device."""
        self.clear()
        if not state:
            return
        g_v = {}
        for name, t in state["g_v"].items():
            p = params.get(name)
            if p is None:
                raise KeyError(f"the checkpoint's LookSAM state names {name!r}, not a parameter of the model.")
            g_v[id(p)] = (p, t.to(device=p.device, dtype=p.dtype))
        self.g_v = g_v
        device = next(iter(g_v.values()))[1].device if g_v else None
        self.norm = state["norm"].to(device)
