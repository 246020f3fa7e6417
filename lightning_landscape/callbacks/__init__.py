"""Lightning callbacks that measure the loss landscape during training."""

from lightning_landscape.callbacks.hessian import HessianCallback

__all__ = ["HessianCallback"]
