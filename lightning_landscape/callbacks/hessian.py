"""``HessianCallback``: top eigenvalues, trace and spectral density of the Hessian during training."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from lightning_landscape._lightning import LightningModule, Trainer
from lightning_landscape.callbacks._base import LossFn, MeasurementCallback, check_bool, check_positive_int
from lightning_landscape.functional import slq_density, top_eigenvalues, trace_estimate
from lightning_landscape.plotting import spectral_density_figure

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

    Example:
        >>> cb = HessianCallback(every_n_train_steps=200, top_k=3, trace=True)
        >>> cb.top_k, cb.trace
        (3, True)
    """

    state_key_fields = (*MeasurementCallback.state_key_fields, "top_k", "trace", "density")
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
        self.eigenvectors: torch.Tensor | None = None
        self._local_eigenvectors = False  # a sharded model's local rows (not saved in checkpoints)

    def check_model(self, pl_module: LightningModule) -> None:
        super().check_model(pl_module)
        count = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if self.top_k > count:
            raise ValueError(
                f"`top_k` must be at most the number of measured parameters ({count}), got {self.top_k}."
            )

    def dropped_state_description(self) -> str:
        return super().dropped_state_description() + ", and the eigenvectors the next estimate warm-starts from,"

    def work_in_gradients(self) -> float:
        # cold block Lanczos (benchmarks/eigen_counts.py): ~9 products for top-1, ~21 for top-3, a few more beyond
        hvps = min(self.max_hvps, 7 * min(self.top_k, 3) + 3 * max(self.top_k - 3, 0) + 2) + 1  # + the stderr
        hvps += 0 if self._validated else 4  # the first measurement checks the exact product
        hvps += self.trace_hvps if self.trace else 0
        hvps += self.density_probes * self.density_steps if self.density else 0
        return 2.0 * hvps

    def figures_per_measurement(self) -> int:
        return int(self.density)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        keep = self.eigenvectors is not None and not self._local_eigenvectors
        state["eigenvectors"] = self.eigenvectors.detach().cpu() if keep else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.eigenvectors = state_dict.get("eigenvectors")

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, float], dict[str, Figure]]:
        scalars: dict[str, float] = {}
        figures: dict[str, Figure] = {}
        with self.operator(trainer, pl_module, self._probe) as op:
            init = self.eigenvectors
            if init is not None and init.shape[-1] != op.size:
                init = None  # the parameter set changed (e.g. layers unfrozen): start cold
            eig = top_eigenvalues(
                op, self.top_k, init=init, max_hvps=self.max_hvps, tol=self.tol, generator=self.generator
            )
            num_hvps = eig.num_hvps
            for i, value in enumerate(eig.eigenvalues.tolist(), start=1):
                scalars[f"eigenvalue_{i}"] = value
            # how much λ1 depends on the probe: the spread of v1ᵀH_b v1 over the probe batches (one product)
            _, spread, batches = op.rayleigh_by_batch(eig.eigenvectors[0])
            num_hvps += 1
            if batches >= 2:
                scalars["eigenvalue_1_stderr"] = spread / math.sqrt(batches)
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
        self.eigenvectors = eig.eigenvectors.detach()
        self._local_eigenvectors = op.space.distributed
        scalars["num_hvps"] = float(num_hvps)
        ratio = _eos_ratio(trainer, scalars["eigenvalue_1"])
        if ratio is not None:
            scalars["eos_ratio"] = ratio
        return scalars, figures


def _eos_ratio(trainer: Trainer, top_eigenvalue: float) -> float | None:
    """``lr·λ₁ / (2 + 2β)`` for plain/momentum SGD (Cohen et al. 2021's edge of stability), else ``None``."""
    if not trainer.optimizers or not isinstance(trainer.optimizers[0], torch.optim.SGD):
        return None
    group = trainer.optimizers[0].param_groups[0]
    lr = float(group["lr"])
    beta = float(group.get("momentum", 0.0) or 0.0)
    return lr * top_eigenvalue / (2.0 + 2.0 * beta)
