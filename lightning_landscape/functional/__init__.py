"""The math on any ``nn.Module``: Hessian-vector products, eigenvalues, trace, density, sharpness,
loss slices, curvature per parameter block, GGN and Fisher, the optimizer's path.

Imports torch only (never Lightning), so it serves plain PyTorch loops and post-hoc analysis.

Example:
    >>> from lightning_landscape import functional as LF
    >>> sorted(n for n in LF.__all__ if n.startswith("hessian"))
    ['hessian_density', 'hessian_eigenvalues', 'hessian_gradient_overlap', 'hessian_trace']
"""

from ._operator import DenseOperator, SymmetricOperator
from ._params import ParamsArg, ParamSpec, match_parameters, select_parameters
from .blocks import BLOCK_SPLITS, PRODUCT_SOURCES, BlockResult, block_curvature, block_estimates, split_blocks
from .curvature import CURVATURES, OUTPUT_LOSSES, CurvatureOperator, curvature_operator
from .eigen import WHICH, EigenResult, hessian_eigenvalues, top_eigenvalues
from .export import save_surface
from .hvp import HVP_METHODS, LossFn, LossOperator, MeasurementError, hvp
from .overlap import gradient_overlap, hessian_gradient_overlap
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
    "BLOCK_SPLITS",
    "CURVATURES",
    "HVP_METHODS",
    "OUTPUT_LOSSES",
    "PRODUCT_SOURCES",
    "WHICH",
    "BlockResult",
    "CurvatureOperator",
    "DenseOperator",
    "DensityResult",
    "EigenResult",
    "LineResult",
    "LossFn",
    "LossOperator",
    "MeasurementError",
    "ParamSpec",
    "ParamsArg",
    "SharpnessResult",
    "SnapshotStore",
    "SurfaceResult",
    "SymmetricOperator",
    "TraceResult",
    "TrajectoryPlane",
    "TrajectorySurface",
    "block_curvature",
    "block_estimates",
    "curvature_operator",
    "filter_normalize",
    "gradient_overlap",
    "grid_coords",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_gradient_overlap",
    "hessian_trace",
    "hvp",
    "loss_line",
    "loss_surface",
    "match_parameters",
    "plane_grid",
    "random_directions",
    "save_surface",
    "select_parameters",
    "sharpness",
    "sharpness_estimate",
    "slq_density",
    "split_blocks",
    "top_eigenvalues",
    "trace_estimate",
    "trajectory_pca",
    "trajectory_surface",
]
