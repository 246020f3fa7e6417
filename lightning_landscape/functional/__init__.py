"""The math on any ``nn.Module``: Hessian-vector products, eigenvalues, trace, density, sharpness,
loss slices.

Imports torch only (never Lightning), so it serves plain PyTorch loops and post-hoc analysis.

Example:
    >>> from lightning_landscape import functional as LF
    >>> sorted(n for n in LF.__all__ if n.startswith("hessian"))
    ['hessian_density', 'hessian_eigenvalues', 'hessian_trace']
"""

from lightning_landscape.functional._operator import DenseOperator, SymmetricOperator
from lightning_landscape.functional._params import ParamSpec, select_parameters
from lightning_landscape.functional.eigen import EigenResult, hessian_eigenvalues, top_eigenvalues
from lightning_landscape.functional.hvp import HVP_METHODS, LossFn, LossOperator, MeasurementError, hvp
from lightning_landscape.functional.sharpness import SharpnessResult, sharpness, sharpness_estimate
from lightning_landscape.functional.surface import (
    LineResult,
    SurfaceResult,
    filter_normalize,
    grid_coords,
    loss_line,
    loss_surface,
    random_directions,
)
from lightning_landscape.functional.trace import (
    DensityResult,
    TraceResult,
    hessian_density,
    hessian_trace,
    slq_density,
    trace_estimate,
)

__all__ = [
    "HVP_METHODS",
    "DenseOperator",
    "DensityResult",
    "EigenResult",
    "LineResult",
    "LossFn",
    "LossOperator",
    "MeasurementError",
    "ParamSpec",
    "SharpnessResult",
    "SurfaceResult",
    "SymmetricOperator",
    "TraceResult",
    "filter_normalize",
    "grid_coords",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hvp",
    "loss_line",
    "loss_surface",
    "random_directions",
    "select_parameters",
    "sharpness",
    "sharpness_estimate",
    "slq_density",
    "top_eigenvalues",
    "trace_estimate",
]
