"""Running the user's ``training_step`` without leaving a trace: one mechanism for measurements and SAM's second pass.

A measurement whose loss is the module's own ``training_step`` runs that user code many times (every loss,
gradient and product on every probe batch); SAM's second pass runs it once more per step. What such a call may
change, and what :func:`invisible_user_code` does about it:

- ``self.log`` / ``self.log_dict``: silenced (nothing reaches the loggers or the progress bar);
- torchmetrics metrics (any ``Metric`` among the module's submodules): frozen — ``update`` does nothing and a call
  returns the last value computed in training, so their states are exactly as training left them;
- plain Python attributes of the module and its submodules (counters, flags, lists such as the
  ``self.training_step_outputs.append(...)`` of Lightning's docs, dicts, sets): restored on exit (numbers and
  strings by value; lists, dicts and sets by content, in place, so other references to them stay valid);
- module buffers are not this module's business: the loss operator evaluates on copies or in eval mode, and SAM
  restores them itself.

What it cannot restore: objects held outside the module (a global list, a file written), attributes of objects the
module holds that are not modules or plain containers (a custom class's fields), and anything a call does to
tensors in place outside autograd.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> net.calls, net.seen = 0, []
    >>> with invisible_user_code(net):
    ...     net.calls += 1
    ...     net.seen.append("probe")
    >>> net.calls, net.seen
    (0, [])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn
from torchmetrics import Metric

__all__ = ["invisible_user_code"]

_SCALARS = (int, float, bool, str, bytes, type(None))
_CONTAINERS = (list, dict, set)
#: attributes every ``nn.Module`` has: torch's bookkeeping, never the user's
_TORCH_KEYS = frozenset(nn.Module().__dict__)


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def _snapshot(module: nn.Module) -> list[tuple[dict[str, Any], str, Any]]:
    saved = []
    for m in module.modules():
        if isinstance(m, Metric):
            continue  # frozen instead
        for key, value in m.__dict__.items():
            if key in _TORCH_KEYS:  # Lightning's own plain attributes are restored too: a measurement changes none
                continue
            if isinstance(value, _SCALARS):
                saved.append((m.__dict__, key, value))
            elif type(value) in _CONTAINERS:
                saved.append((m.__dict__, key, (value, value.copy())))
    return saved


def _restore(saved: list[tuple[dict[str, Any], str, Any]]) -> None:
    for owner, key, value in saved:
        if isinstance(value, tuple):
            container, content = value
            owner[key] = container  # the same object as before, with the same content
            if container != content:
                if isinstance(container, list):
                    container[:] = content
                else:
                    container.clear()
                    container.update(content)
        elif owner.get(key, _no_op) is not value:
            owner[key] = value


def _freeze_metrics(module: nn.Module) -> list[tuple[Metric, dict[str, Any]]]:
    """Makes each torchmetrics ``Metric`` a no-op whose call returns the last value training computed."""
    frozen = []
    for m in module.modules():
        if not isinstance(m, Metric):
            continue
        previous = {name: m.__dict__[name] for name in ("forward", "update") if name in m.__dict__}
        cached = m.__dict__.get("_forward_cache")
        m.__dict__["forward"] = lambda *a, _cached=cached, **k: _cached
        m.__dict__["update"] = _no_op
        frozen.append((m, previous))
    return frozen


def _thaw_metrics(frozen: list[tuple[Metric, dict[str, Any]]]) -> None:
    for m, previous in frozen:
        for name in ("forward", "update"):
            if name in previous:
                m.__dict__[name] = previous[name]
            else:
                m.__dict__.pop(name, None)


@contextlib.contextmanager
def invisible_user_code(module: nn.Module, silence_logging: bool = True) -> Iterator[None]:
    """Within the block, calls into ``module``'s code leave no trace on logging, metrics or plain attributes.

    See the module docstring for exactly what is kept and what is not.
    """
    silenced = {"log": _no_op, "log_dict": _no_op} if silence_logging else {}
    previous = {name: module.__dict__.get(name) for name in silenced}
    saved = _snapshot(module)
    frozen = _freeze_metrics(module)
    module.__dict__.update(silenced)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value
        _thaw_metrics(frozen)
        _restore(saved)
