"""The math on any ``nn.Module``: Hessian-vector products, eigenvalues, trace, density, sharpness,
loss slices.

Imports torch only (never Lightning), so it serves plain PyTorch loops and post-hoc analysis.

Example:
    >>> from lightning_landscape import functional as LF
    >>> sorted(n for n in LF.__all__ if n.startswith("hessian"))
    ['hessian_density', 'hessian_eigenvalues', 'hessian_trace']
"""

from ._operator import DenseOperator, SymmetricOperator
from ._params import ParamSpec, select_parameters
from .curvature import CURVATURES, OUTPUT_LOSSES, CurvatureOperator, curvature_operator
from .eigen import WHICH, EigenResult, hessian_eigenvalues, top_eigenvalues
from .export import save_surface
from .hvp import HVP_METHODS, LossFn, LossOperator, MeasurementError, hvp
from .sharpness import SharpnessResult, sharpness, sharpness_estimate
from .surface import (
    LineResult,
    SurfaceResult,
    filter_normalize,
    grid_coords,
    loss_line,
    loss_surface,
    random_directions,
)
from .trace import (
    DensityResult,
    TraceResult,
    hessian_density,
    hessian_trace,
    slq_density,
    trace_estimate,
)
from .trajectory import (
    SnapshotStore,
    TrajectoryPlane,
    TrajectorySurface,
    plane_grid,
    trajectory_pca,
    trajectory_surface,
)

__all__ = [
    "CURVATURES",
    "HVP_METHODS",
    "OUTPUT_LOSSES",
    "WHICH",
    "CurvatureOperator",
    "DenseOperator",
    "DensityResult",
    "EigenResult",
    "LineResult",
    "LossFn",
    "LossOperator",
    "MeasurementError",
    "ParamSpec",
    "SharpnessResult",
    "SnapshotStore",
    "SurfaceResult",
    "SymmetricOperator",
    "TraceResult",
    "TrajectoryPlane",
    "TrajectorySurface",
    "curvature_operator",
    "filter_normalize",
    "grid_coords",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hvp",
    "loss_line",
    "loss_surface",
    "plane_grid",
    "random_directions",
    "save_surface",
    "select_parameters",
    "sharpness",
    "sharpness_estimate",
    "slq_density",
    "top_eigenvalues",
    "trace_estimate",
    "trajectory_pca",
    "trajectory_surface",
]
