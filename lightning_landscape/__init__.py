"""lightning-landscape: watch, and train for, the geometry of the loss landscape in PyTorch Lightning.

Example:
    >>> from lightning_landscape import HessianCallback, functional
    >>> HessianCallback(every_n_epochs=1).prefix
    'hessian'
"""

from lightning_landscape import functional
from lightning_landscape.callbacks import HessianCallback, LossLandscapeCallback, SharpnessCallback
from lightning_landscape.sam import SAMMixin

__version__ = "0.1.0"

__all__ = [
    "HessianCallback",
    "LossLandscapeCallback",
    "SAMMixin",
    "SharpnessCallback",
    "__version__",
    "functional",
]
