"""Lightning callbacks that measure the loss landscape during training."""

from lightning_landscape.callbacks.hessian import HessianCallback
from lightning_landscape.callbacks.landscape import LossLandscapeCallback

__all__ = ["HessianCallback", "LossLandscapeCallback"]
