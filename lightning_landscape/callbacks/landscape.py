"""``LossLandscapeCallback``: 2D and 1D slices of the loss around the weights, frame after frame."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_landscape._lightning import LightningModule, Trainer
from lightning_landscape.callbacks._base import LossFn, MeasurementCallback, check_bool
from lightning_landscape.functional._random import gaussian
from lightning_landscape.functional._sharded import is_sharded
from lightning_landscape.functional.surface import (
    _numel,
    _sharded_layout,
    check_grid_args,
    filter_normalize,
    loss_line,
    loss_surface,
)
from lightning_landscape.plotting import line_figure, surface_figure, surface_mesh

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class LossLandscapeCallback(MeasurementCallback):
    """Logs a low-resolution 2D slice of the loss around the current weights, and a 1D slice with the
    training and validation loss on the same axes (Li et al. 2018, filter-normalized random directions).

    Two raw Gaussian directions are drawn once per run from the callback's own generator and kept in
    :meth:`state_dict` (a resumed run continues the same frames); at every frame they are filter-normalized
    to the current weights (:func:`~lightning_landscape.functional.surface.filter_normalize`), so sliding
    through the frames shows the basin forming. The probe batches are fixed too. The 1D slice runs along the
    first direction (the 2D slice's horizontal midline, at finer resolution); the validation curve is drawn
    when the trainer has a validation loader (a probe of it of the same size, taken once).

    Logged (under ``landscape/``): images ``surface_2d`` (filled contour and 3D surface, log-scale colour,
    non-finite points masked) and ``slice_1d``; the 2D slice also as a TensorBoard mesh ``surface_3d`` (rotate and
    zoom in the browser; log10 height, coloured by loss, θ marked; ``mesh=False`` leaves it out); scalars
    ``center_loss`` (probe loss at the weights),
    ``rise_at_edge`` (mean loss increase on the 2D grid's outer ring over the centre, over finite points),
    ``nonfinite_fraction`` (of the 2D grid) and ``seconds``. Divergent grid points are NaN in the data and
    masked in the pictures; a scalar that cannot be finite (e.g. the centre itself diverged) is left out
    rather than logged, so training goes on.

    Cost: ``steps² + steps_1d`` (``+ steps_1d`` with validation) forward passes over the probe batches, plus
    drawing. The defaults (11×11 and 21, i.e. 163 forward passes over one batch) keep a frame at a few
    seconds for a ResNet-sized model on a CPU and well under a second on a GPU.

    Args:
        every_n_train_steps: measure every ``n`` optimizer steps (or give ``every_n_epochs``, or neither:
            see ``max_overhead``).
        every_n_epochs: measure at the end of every ``n``-th epoch.
        steps: grid points per axis of the 2D slice, odd (>= 3) so that the middle point is the weights.
        distance: half-width of both slices, in units of the filter-normalized directions.
        steps_1d: points of the 1D slice, odd (>= 3).
        num_batches: probe batches (train, and validation for the 1D overlay) (or give ``num_samples``).
        num_samples: probe size in samples instead (default: one batch).
        loss_fn: ``loss_fn(module, batch) -> scalar``; default the module's ``training_step``.
        include_1d: also move one-dimensional parameters (biases, normalization layers); Li et al. leave
            them fixed.
        validation: draw the validation curve on the 1D slice when a validation loader exists.
        eval_mode: measure in eval mode.
        seed: seed of the callback's generator (directions) and of the probe draw.
        strict: raise instead of warning when a measurement fails.
        max_overhead: with neither schedule (the default), the share of the fit's wall time this callback
            may take; ``None`` shares 5% among the trainer's callbacks that use the default.
        mesh: also log the 2D slice as a TensorBoard mesh (other loggers have no mesh view).

    Example:
        >>> cb = LossLandscapeCallback(every_n_epochs=1)
        >>> cb.prefix, cb.steps, cb.steps_1d
        ('landscape', 11, 21)
    """

    state_key_fields = (*MeasurementCallback.state_key_fields, "steps", "distance")
    prefix = "landscape"

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        steps: int = 11,
        distance: float = 1.0,
        steps_1d: int = 21,
        num_batches: int | None = None,
        num_samples: int | None = None,
        loss_fn: LossFn | None = None,
        include_1d: bool = False,
        validation: bool = True,
        eval_mode: bool = True,
        seed: int = 0,
        strict: bool = False,
        max_overhead: float | None = None,
        mesh: bool = True,
    ) -> None:
        super().__init__(
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            max_overhead=max_overhead,
            num_batches=num_batches,
            num_samples=num_samples,
            loss_fn=loss_fn,
            eval_mode=eval_mode,
            seed=seed,
            strict=strict,
        )
        check_grid_args(distance, steps=steps, steps_1d=steps_1d)
        self.steps = steps
        self.distance = float(distance)
        self.steps_1d = steps_1d
        check_bool("include_1d", include_1d)
        check_bool("validation", validation)
        check_bool("mesh", mesh)
        self.mesh = mesh
        self.include_1d = include_1d
        self.validation = validation
        #: the raw (not normalized) directions ``[2, numel]`` on the CPU, drawn at the first frame.
        self.directions: Tensor | None = None
        self._local_directions = False  # drawn as a sharded model's local rows (not saved in checkpoints)

    @property
    def needs_val_probe(self) -> bool:
        return self.validation

    def dropped_state_description(self) -> str:
        return super().dropped_state_description() + ", and the slices' directions (later frames are not comparable)"

    def work_in_gradients(self) -> float:
        forwards = self.steps**2 + self.steps_1d * (2 if self.validation else 1)
        return forwards / 3.0

    def figures_per_measurement(self) -> int:
        return 2

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # a sharded model's directions are this process's rows: not saved (a resume draws new ones)
        keep = self.directions is not None and not self._local_directions
        state["directions"] = self.directions.detach().cpu().clone() if keep else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        directions = state_dict.get("directions")
        self.directions = None if directions is None else directions.detach().cpu().clone()

    def _raw_directions(self, numel: int, pl_module: LightningModule | None = None) -> Tensor:
        if self.directions is not None and self.directions.shape == (2, numel):
            return self.directions
        if pl_module is not None and is_sharded(pl_module):  # this process's rows of the same global draw
            self.directions = _sharded_layout(pl_module, None)[0].gaussian(
                2, numel, self.generator, torch.float32, torch.device("cpu")
            )
            self._local_directions = True
            return self.directions
        if self.directions is not None:
            self._logger.warn_once(
                "directions-redrawn",
                f"the measured parameters changed ({self.directions.shape[1]} -> {numel} entries); new directions "
                "were drawn, so frames before and after are not comparable.",
            )
        self.directions = gaussian((2, numel), self.generator, torch.float32, torch.device("cpu"))
        return self.directions

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, float], dict[str, Figure]]:
        dirs = filter_normalize(pl_module, self._raw_directions(_numel(pl_module, None), pl_module),
                                include_1d=self.include_1d)  # fmt: skip
        loss_fn = self.resolved_loss_fn
        common = dict(distance=self.distance, eval_mode=self.eval_mode, reduce_fn=self.reduce_fn(trainer))
        surface = loss_surface(pl_module, loss_fn, self._probe, self.steps, directions=dirs, **common)
        train_line = loss_line(pl_module, loss_fn, self._probe, self.steps_1d, direction=dirs[0], **common)
        val_line = None
        if self.validation:
            val_batches = self.val_probe(trainer)
            if val_batches:
                val_line = loss_line(pl_module, loss_fn, val_batches, self.steps_1d, direction=dirs[0], **common)

        scalars = {"nonfinite_fraction": surface.nonfinite_fraction}
        for name, value in (("center_loss", surface.center_loss), ("rise_at_edge", surface.rise_at_edge())):
            if math.isfinite(value):
                scalars[name] = value
        figures: dict[str, Figure] = {}
        if trainer.is_global_zero:
            step = trainer.global_step
            figures[f"{self.prefix}/surface_2d"] = surface_figure(
                surface.coords, surface.losses, title=f"Loss surface, step {step}"
            )
            if self.mesh:
                figures[f"{self.prefix}/surface_3d"] = surface_mesh(surface.coords, surface.coords, surface.losses)
            figures[f"{self.prefix}/slice_1d"] = line_figure(
                train_line.coords,
                train_line.losses,
                None if val_line is None else val_line.losses,
                title=f"Loss along direction 1, step {step}",
            )
        return scalars, figures
