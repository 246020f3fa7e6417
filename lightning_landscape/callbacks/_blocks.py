"""The ``blocks=`` argument the callbacks share: checked when a callback is built, resolved at fit start.

A LightningModule usually holds its network in one attribute (``self.net``, ``self.model``), so splitting the
module itself "by top-level module" would give one block. The callbacks therefore split the *network*: they
descend from the LightningModule through children that hold every parameter alone, and split there; block names
and the names or patterns of a ``{block: patterns}`` mapping are relative to that root (``"0"``, ``"encoder.*"``);
the parameter names a block holds stay the module's own (``"net.0.weight"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_landscape.functional.blocks import BLOCK_SPLITS, split_blocks

__all__ = ["MAX_BLOCK_TAGS", "BlocksArg", "check_blocks", "resolve_blocks"]

BlocksArg = None | str | Mapping[str, Any]

#: more blocks than this: per-block scalars would flood the logger's tag list; a clear error says how to group them
MAX_BLOCK_TAGS = 32


def check_blocks(blocks: object) -> BlocksArg:
    """``blocks`` if it is ``None``, one of :data:`~lightning_landscape.functional.blocks.BLOCK_SPLITS`, or a
    non-empty mapping ``{block name: names / glob patterns / predicate}``; else a ``ValueError`` naming it.

    Example:
        >>> check_blocks("layer")
        'layer'
        >>> check_blocks("layers")
        Traceback (most recent call last):
        ...
        ValueError: `blocks` must be None, one of ('module', 'layer', 'parameter') or a mapping {block name: parameter names / glob patterns}, got 'layers'.
    """  # noqa: E501
    accepted = f"None, one of {BLOCK_SPLITS} or a mapping {{block name: parameter names / glob patterns}}"
    if blocks is None or (isinstance(blocks, str) and blocks in BLOCK_SPLITS):
        return blocks
    if isinstance(blocks, Mapping) and blocks and all(isinstance(k, str) and k for k in blocks):
        for key, spec in blocks.items():
            ok = isinstance(spec, str) or callable(spec)
            ok = ok or (isinstance(spec, Sequence) and bool(spec) and all(isinstance(s, str) for s in spec))
            if not ok:
                raise ValueError(f"`blocks`[{key!r}] must be a name, a glob pattern, a list of them or a predicate.")
        return dict(blocks)
    raise ValueError(f"`blocks` must be {accepted}, got {blocks!r}.")


def _network_root(module: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, submodule)``: descend while one child holds every trainable parameter (and the module none)."""
    prefix = ""
    while True:
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        holders = [(n, c) for n, c in module.named_children() if any(p.requires_grad for p in c.parameters())]
        if own or len(holders) != 1:
            return prefix, module
        name, module = holders[0]
        prefix = f"{prefix}{name}."


def resolve_blocks(
    module: nn.Module, blocks: BlocksArg, owner: str, limit: int | None = MAX_BLOCK_TAGS
) -> dict[str, list[str]]:
    """``{block name: [parameter names of module]}`` for the callback ``owner``; a ``ValueError`` (naming
    ``blocks``) when a pattern matches nothing or there are more than ``limit`` blocks (``None``: no limit).

    Example:
        >>> class Module(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> resolve_blocks(Module(), "module", "SharpnessCallback")
        {'0': ['net.0.weight', 'net.0.bias'], '2': ['net.2.weight', 'net.2.bias']}
        >>> resolve_blocks(Module(), {"hidden": "0.*"}, "SharpnessCallback")
        {'hidden': ['net.0.weight', 'net.0.bias']}
    """
    prefix, root = _network_root(module)
    try:
        found = split_blocks(root, blocks)
    except ValueError as err:
        raise ValueError(f"{owner}: `blocks`: {err}") from None
    if limit is not None and len(found) > limit:
        raise ValueError(
            f"{owner}: `blocks`={blocks!r} gives {len(found)} blocks, more than {limit} (one tag each would "
            "flood the logger); use a coarser split ('module') or a mapping that groups them, e.g. "
            '{"encoder": "encoder.*", "head": "head.*"}.'
        )
    return {name: [prefix + p for p in params] for name, params in found.items()}
