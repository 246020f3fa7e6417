"""lightning-landscape: watch, and train for, the geometry of the loss landscape in PyTorch Lightning.

The callbacks and ``SAMMixin`` are imported on first use, so ``import lightning_landscape.functional``
loads torch only, never Lightning: the math serves plain PyTorch loops and post-hoc analysis too.

Example:
    >>> from lightning_landscape import HessianCallback, functional
    >>> HessianCallback(every_n_epochs=1).prefix
    'hessian'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_landscape import functional

if TYPE_CHECKING:
    from lightning_landscape.callbacks import (
        HessianCallback,
        LossLandscapeCallback,
        SharpnessCallback,
        TrajectoryCallback,
    )
    from lightning_landscape.sam import SAMMixin

__version__ = "0.1.0"

__all__ = [
    "HessianCallback",
    "LossLandscapeCallback",
    "SAMMixin",
    "SharpnessCallback",
    "TrajectoryCallback",
    "__version__",
    "functional",
]

_LAZY = {
    "HessianCallback": "lightning_landscape.callbacks",
    "LossLandscapeCallback": "lightning_landscape.callbacks",
    "SharpnessCallback": "lightning_landscape.callbacks",
    "TrajectoryCallback": "lightning_landscape.callbacks",
    "SAMMixin": "lightning_landscape.sam",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_landscape' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
