"""Lightning callbacks that measure the loss landscape during training."""

from lightning_landscape.callbacks.hessian import HessianCallback
from lightning_landscape.callbacks.landscape import LossLandscapeCallback
from lightning_landscape.callbacks.sharpness import SharpnessCallback
from lightning_landscape.callbacks.trajectory import TrajectoryCallback

__all__ = ["HessianCallback", "LossLandscapeCallback", "SharpnessCallback", "TrajectoryCallback"]
