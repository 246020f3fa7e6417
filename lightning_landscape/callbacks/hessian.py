"""``HessianCallback``: top eigenvalues, trace and spectral density of the Hessian during training."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_landscape._lightning import LightningModule, Trainer
from lightning_landscape.callbacks._base import LossFn, MeasurementCallback, check_bool, check_positive_int
from lightning_landscape.callbacks._blocks import MAX_BLOCK_TAGS, BlocksArg, check_blocks, resolve_blocks
from lightning_landscape.functional import (
    CURVATURES,
    OUTPUT_LOSSES,
    WHICH,
    CurvatureOperator,
    block_curvature,
    gradient_overlap,
    slq_density,
    top_eigenvalues,
    trace_estimate,
)
from lightning_landscape.functional._sharded import is_sharded
from lightning_landscape.functional.blocks import missing_parameters
from lightning_landscape.functional.curvature import OutputFn, OutputLoss
from lightning_landscape.functional.hvp import LossOperator
from lightning_landscape.plotting import blocks_heatmap_figure, spectral_density_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class HessianCallback(MeasurementCallback):
    """Logs the Hessian's top eigenvalues, its trace and spectral density at scheduled steps.

    Measured on the module's device over a fixed probe set (``num_batches``, default one, or
    ``num_samples``), in eval mode, without touching weights, gradients, buffers, modes or the global RNG.
    Each eigenvalue estimate warm-starts from the last one's eigenvectors.

    Logged (under ``hessian/``): ``eigenvalue_1..k``; ``eigenvalue_1_stderr``, how much ``eigenvalue_1`` depends
    on the probe (the spread of ``v1ᵀH_b v1`` over the probe batches ``b``, over the square root of their number:
    a change smaller than about twice it is probe noise; logged with two or more probe batches); ``num_hvps``,
    ``seconds``, ``trace`` (with
    ``trace=True``), ``eos_ratio = lr·eigenvalue_1 / (2 + 2·momentum)`` when the optimizer is SGD
    (1.0 is where gradient descent stops being stable), and with ``density=True`` the image
    ``hessian/spectral_density``.

    Where the curvature lives (all off by default):

    - ``which="smallest"`` / ``"both"``: also (or only) the most negative eigenvalues, ``eigenvalue_min_1..k``
      (a clearly negative one: the weights sit at a saddle; they converge slowly near a minimum, where they cluster
      around 0: ``num_hvps`` shows the price).
    - ``curvature="ggn"`` / ``"fisher"`` / ``"empirical_fisher"`` with ``output_loss`` (and ``output_fn``): the
      generalized Gauss–Newton matrix or a Fisher instead of the Hessian (see
      :func:`~lightning_landscape.functional.curvature_operator`); the tags then start with ``ggn/``, ``fisher/`` or
      ``empirical_fisher/`` instead of ``hessian/``.
    - ``blocks="module"`` / ``"layer"`` / ``"parameter"`` / ``{name: patterns}``: the top eigenvalue (and with
      ``trace=True`` the trace, ``block_trace_hvps`` products each) of every block's Hessian ``H_jj`` (the network's
      layers, as :mod:`lightning_landscape.callbacks._blocks` finds them), logged as ``hessian/<block>/eigenvalue_1``
      and ``hessian/<block>/trace`` for up to 32 blocks, and always as the image ``hessian/blocks``: blocks (rows) ×
      measurements (columns) of the top eigenvalue, log colour, which holds every block however many there are.
      ``hessian/blocks/num_hvps`` is their cost. Not for sharded models, and with the Hessian only.
    - ``gradient_overlap=True``: ``gradient_overlap``, the share of the probe gradient in the top-``k`` eigenspace,
      ‖P_k g‖²/‖g‖² (Gur-Ari et al. 2018: training happens mostly there), one more gradient.

    Args:
        every_n_train_steps: measure every ``n`` optimizer steps (or give ``every_n_epochs``, or neither:
            see ``max_overhead``).
        every_n_epochs: measure at the end of every ``n``-th epoch.
        top_k: how many top eigenvalues.
        trace: also estimate the trace (Hutch++, ``trace_hvps`` products).
        density: also estimate the spectral density (SLQ) and log its picture.
        num_batches: probe batches (or give ``num_samples``).
        num_samples: probe size in samples instead (default: one batch).
        loss_fn: ``loss_fn(module, batch) -> scalar``; default the module's ``training_step``.
        tol: relative eigenvalue tolerance of the Lanczos solver.
        max_hvps: product budget of the eigenvalue solver.
        trace_hvps: product budget of the trace estimate.
        density_probes: SLQ probe vectors.
        density_steps: Lanczos steps per SLQ probe.
        hvp_method: see ``lightning_landscape.functional.HVP_METHODS``.
        eval_mode: measure in eval mode.
        seed: seed of the callback's generator.
        strict: raise instead of warning when a measurement fails.
        max_overhead: with neither schedule (the default), the share of the fit's wall time this callback
            may take; ``None`` shares 5% among the trainer's callbacks that use the default.
        which: ``"largest"``, ``"smallest"`` or ``"both"`` (algebraic; see above).
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        output_loss: with ``curvature != "hessian"``: ``"cross_entropy"``, ``"mse"`` or ``(output, batch) ->
            scalar`` (mean over the batch), the loss of the model's output.
        output_fn: ``output_fn(module, batch) -> output``; default ``module(batch[0])``.
        blocks: per-block curvature (see above).
        block_trace_hvps: products per block for its trace (exact for blocks no larger).
        gradient_overlap: log the gradient's share in the top-``k`` eigenspace.

    Example:
        >>> cb = HessianCallback(every_n_train_steps=200, top_k=3, trace=True)
        >>> cb.top_k, cb.trace
        (3, True)
        >>> HessianCallback(curvature="ggn", output_loss="cross_entropy", which="both").prefix
        'ggn'
    """

    state_key_fields = (*MeasurementCallback.state_key_fields, "top_k", "trace", "density", "curvature", "which")
    prefix = "hessian"

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        top_k: int = 1,
        trace: bool = False,
        density: bool = False,
        num_batches: int | None = None,
        num_samples: int | None = None,
        loss_fn: LossFn | None = None,
        tol: float = 1e-3,
        max_hvps: int = 100,
        trace_hvps: int = 99,
        density_probes: int = 4,
        density_steps: int = 40,
        hvp_method: str = "auto",
        eval_mode: bool = True,
        seed: int = 0,
        strict: bool = False,
        max_overhead: float | None = None,
        which: str = "largest",
        curvature: str = "hessian",
        output_loss: str | OutputLoss | None = None,
        output_fn: OutputFn | None = None,
        blocks: BlocksArg = None,
        block_trace_hvps: int = 30,
        gradient_overlap: bool = False,
    ) -> None:
        super().__init__(
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            max_overhead=max_overhead,
            num_batches=num_batches,
            num_samples=num_samples,
            loss_fn=loss_fn,
            hvp_method=hvp_method,
            eval_mode=eval_mode,
            seed=seed,
            strict=strict,
        )
        check_positive_int("top_k", top_k)
        check_bool("trace", trace)
        check_bool("density", density)
        check_positive_int("max_hvps", max_hvps)
        check_positive_int("trace_hvps", trace_hvps)
        check_positive_int("density_probes", density_probes)
        check_positive_int("density_steps", density_steps)
        if max_hvps < top_k:
            raise ValueError(f"`max_hvps` must be >= top_k ({top_k}), got {max_hvps}.")
        if trace and trace_hvps < 3:
            raise ValueError(f"`trace_hvps` must be >= 3 (Hutch++ splits it in three), got {trace_hvps}.")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"`tol` must be a number in (0, 1), got {tol!r}.")
        self.top_k = top_k
        self.trace = trace
        self.density = density
        self.tol = float(tol)
        self.max_hvps = max_hvps
        self.trace_hvps = trace_hvps
        self.density_probes = density_probes
        self.density_steps = density_steps
        if which not in WHICH:
            raise ValueError(f"`which` must be one of {WHICH}, got {which!r}.")
        if curvature not in CURVATURES:
            raise ValueError(f"`curvature` must be one of {CURVATURES}, got {curvature!r}.")
        if curvature == "hessian" and (output_loss is not None or output_fn is not None):
            raise ValueError("`output_loss` / `output_fn` are for curvature='ggn', 'fisher' or 'empirical_fisher'.")
        if curvature != "hessian":
            if output_loss is None:
                raise ValueError(
                    f"curvature={curvature!r} needs the loss split into model output and output loss: pass "
                    f"`output_loss` (one of {OUTPUT_LOSSES} or a callable (output, batch) -> scalar) and, unless the "
                    "output is `module(batch[0])`, `output_fn(module, batch)`."
                )
            if isinstance(output_loss, str) and output_loss not in OUTPUT_LOSSES:
                raise ValueError(f"`output_loss` must be one of {OUTPUT_LOSSES} or a callable, got {output_loss!r}.")
            if loss_fn is not None:
                raise ValueError(f"curvature={curvature!r} takes `output_loss` (and `output_fn`), not `loss_fn`.")
        check_positive_int("block_trace_hvps", block_trace_hvps)
        check_bool("gradient_overlap", gradient_overlap)
        if gradient_overlap and which == "smallest":
            raise ValueError("`gradient_overlap=True` needs the top eigenvectors: which='largest' or 'both'.")
        self.blocks = check_blocks(blocks)
        if self.blocks is not None and curvature != "hessian":
            raise ValueError("`blocks` measures the Hessian's blocks: use it with curvature='hessian'.")
        self.which = which
        self.curvature = curvature
        self.output_loss = output_loss
        self.output_fn = output_fn
        self.block_trace_hvps = block_trace_hvps
        self.gradient_overlap = gradient_overlap
        if curvature != "hessian":
            self.prefix = curvature
        self.eigenvectors: torch.Tensor | None = None
        self._local_eigenvectors = False  # a sharded model's local rows (not saved in checkpoints)
        self._block_params: dict[str, list[str]] | None = None
        #: the per-block heatmap's data: measured steps and, per block, its top eigenvalue at each (NaN: missing)
        self.block_history: dict[str, Any] = {"steps": [], "eigenvalues": {}}

    def check_model(self, pl_module: LightningModule) -> None:
        super().check_model(pl_module)
        count = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if self.top_k > count:
            raise ValueError(f"`top_k` must be at most the number of measured parameters ({count}), got {self.top_k}.")
        if is_sharded(pl_module) and (self.blocks is not None or self.curvature != "hessian"):
            raise ValueError(
                "HessianCallback: `blocks` and curvature != 'hessian' are not supported for a sharded (FSDP2) module."
            )
        if self.blocks is not None:
            self._block_params = resolve_blocks(pl_module, self.blocks, type(self).__name__, limit=None)

    def operator(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batches: Any,
        params: Any = None,
    ) -> LossOperator:
        """The Hessian's operator (see the base class), or the GGN's / Fisher's with ``curvature``."""
        if self.curvature == "hessian":
            return super().operator(trainer, pl_module, batches, params)
        return CurvatureOperator(
            pl_module,
            batches,
            params,
            curvature=self.curvature,
            output_fn=self.output_fn,
            output_loss=self.output_loss,
            eval_mode=self.eval_mode,
            generator=self.generator,
            reduce_fn=self.reduce_fn(trainer),
        )

    def dropped_state_description(self) -> str:
        return super().dropped_state_description() + ", and the eigenvectors the next estimate warm-starts from,"

    def work_in_gradients(self) -> float:
        # cold block Lanczos (benchmarks/eigen_counts.py): ~9 products for top-1, ~21 for top-3, a few more beyond
        hvps = min(self.max_hvps, 7 * min(self.top_k, 3) + 3 * max(self.top_k - 3, 0) + 2) + 1  # + the stderr
        hvps *= 2 if self.which == "both" else 1
        blocks = len(self._block_params or {})
        hvps += blocks * (9 + (self.block_trace_hvps if self.trace else 0))
        hvps += 1 if self.gradient_overlap else 0
        hvps += 0 if self._validated else 4  # the first measurement checks the exact product
        hvps += self.trace_hvps if self.trace else 0
        hvps += self.density_probes * self.density_steps if self.density else 0
        return 2.0 * hvps

    def figures_per_measurement(self) -> int:
        return int(self.density) + int(self.blocks is not None)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        keep = self.eigenvectors is not None and not self._local_eigenvectors
        state["eigenvectors"] = self.eigenvectors.detach().cpu() if keep else None
        state["block_history"] = self.block_history
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.eigenvectors = state_dict.get("eigenvectors")
        self.block_history = state_dict.get("block_history") or {"steps": [], "eigenvalues": {}}

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, float], dict[str, Figure]]:
        scalars: dict[str, float] = {}
        figures: dict[str, Figure] = {}
        with self.operator(trainer, pl_module, self._probe) as op:
            init = self.eigenvectors
            if init is not None and init.shape[-1] != op.size:
                init = None  # the parameter set changed (e.g. layers unfrozen): start cold
            k = self.top_k
            if init is not None and self.which == "both" and init.shape[0] != 2 * k:
                init = None  # a warm start for both ends holds both halves
            eig = top_eigenvalues(
                op,
                k,
                init=init,
                max_hvps=self.max_hvps,
                tol=self.tol,
                generator=self.generator,
                which=self.which,
            )
            num_hvps = eig.num_hvps
            values = eig.eigenvalues.tolist()
            top = values[:k] if self.which != "smallest" else []
            bottom = values[k:] if self.which == "both" else values if self.which == "smallest" else []
            for i, value in enumerate(top, start=1):
                scalars[f"eigenvalue_{i}"] = value
            for i, value in enumerate(bottom, start=1):
                scalars[f"eigenvalue_min_{i}"] = value
            if top and self.curvature == "hessian":
                # how much λ1 depends on the probe: the spread of v1ᵀH_b v1 over the probe batches (one product)
                _, spread, batches = op.rayleigh_by_batch(eig.eigenvectors[0])
                num_hvps += 1
                if batches >= 2:
                    scalars["eigenvalue_1_stderr"] = spread / math.sqrt(batches)
            if self.gradient_overlap:
                _, gradient = op.gradient()
                share = gradient_overlap(eig.eigenvectors[:k], gradient, space=op.space)
                scalars["gradient_overlap"] = float(share[-1])
            if self.trace:
                tr = trace_estimate(op, self.trace_hvps, generator=self.generator)
                scalars["trace"] = tr.estimate
                num_hvps += tr.num_hvps
            if self.density:
                dens = slq_density(
                    op, num_probes=self.density_probes, num_steps=self.density_steps, generator=self.generator
                )
                num_hvps += dens.num_hvps
                figures["hessian/spectral_density"] = spectral_density_figure(
                    dens.grid, dens.density, title=f"Hessian spectral density, step {trainer.global_step}"
                )
            num_hvps += op.probe_hvps
            self.note_method(trainer, op)
            blocks = self._blocks_of(pl_module)
            if blocks:  # from the same operator: its gradient graph and checked method, λ1's vector as the start
                self._measure_blocks(
                    trainer, pl_module, blocks, scalars, figures, op, eig.eigenvectors[:1] if top else None
                )
        self.eigenvectors = eig.eigenvectors.detach()
        self._local_eigenvectors = op.space.distributed
        scalars["num_hvps"] = float(num_hvps)
        if "eigenvalue_1" in scalars and self.curvature == "hessian":
            ratio = _eos_ratio(trainer, scalars["eigenvalue_1"])
            if ratio is not None:
                scalars["eos_ratio"] = ratio
        return scalars, figures

    def _measure_blocks(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        blocks: dict[str, list[str]],
        scalars: dict[str, float],
        figures: dict[str, Figure],
        operator: Any,
        init: torch.Tensor | None,
    ) -> None:
        if not isinstance(operator, LossOperator) or missing_parameters(operator, blocks):
            operator = init = None  # (a curvature operator, or the blocks reach beyond `params`): a fresh one
        result = block_curvature(
            pl_module,
            self.resolved_loss_fn,
            self._probe,
            blocks,
            trace=self.trace,
            tol=self.tol,
            max_hvps=self.max_hvps,
            trace_samples=self.block_trace_hvps,
            generator=self.generator,
            hvp_method=self.hvp_method,
            eval_mode=self.eval_mode,
            reduce_fn=self.reduce_fn(trainer),
            operator=operator,
            init=init,
        )
        tagged = len(blocks) <= MAX_BLOCK_TAGS
        for name, value in result.eigenvalues.items():
            if tagged:
                scalars[f"{self.prefix}/{name}/eigenvalue_1"] = value
                if self.trace:
                    scalars[f"{self.prefix}/{name}/trace"] = result.traces[name]
        scalars[f"{self.prefix}/blocks/num_hvps"] = float(result.total_hvps)
        history = self.block_history
        history["steps"].append(int(trainer.global_step))
        for name in blocks:
            column = history["eigenvalues"].setdefault(name, [math.nan] * (len(history["steps"]) - 1))
            column.append(float(result.eigenvalues.get(name, math.nan)))
        for column in history["eigenvalues"].values():  # a block no longer measured: a gap
            if len(column) < len(history["steps"]):
                column.append(math.nan)
        if trainer.is_global_zero:
            names = list(history["eigenvalues"])
            figures[f"{self.prefix}/blocks"] = blocks_heatmap_figure(
                names,
                history["steps"],
                np.array([history["eigenvalues"][n] for n in names]),
                title=f"Top Hessian eigenvalue per block, step {trainer.global_step}",
            )


def _eos_ratio(trainer: Trainer, top_eigenvalue: float) -> float | None:
    """``lr·λ₁ / (2 + 2β)`` for plain/momentum SGD (Cohen et al. 2021's edge of stability), else ``None``."""
    if not trainer.optimizers or not isinstance(trainer.optimizers[0], torch.optim.SGD):
        return None
    group = trainer.optimizers[0].param_groups[0]
    lr = float(group["lr"])
    beta = float(group.get("momentum", 0.0) or 0.0)
    return lr * top_eigenvalue / (2.0 + 2.0 * beta)
