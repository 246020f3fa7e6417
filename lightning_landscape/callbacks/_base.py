"""What every measurement callback shares: schedule, probe data, loss, DDP reduction, failures, logging.

Subclasses implement :meth:`MeasurementCallback.measure` (the math, through
:mod:`lightning_landscape.functional`) and return scalars and figures; this class decides
*when* they run, *on what data* and *where results go*.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from lightning_landscape.callbacks._logging import MeasurementLogger
from lightning_landscape.callbacks._probe import take_batches
from lightning_landscape.functional import HVP_METHODS, LossOperator, MeasurementError
from lightning_landscape.functional._batches import apply_to_tensors, clone_if_inference

LossFn = Callable[[torch.nn.Module, Any], Tensor]
_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy")


def check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")


def check_bool(name: str, value: object) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")


def training_step_loss(module: pl.LightningModule, batch: Any) -> Tensor:
    """The loss the module's own ``training_step`` returns (``out`` or ``out["loss"]``), with
    ``self.log`` / ``self.log_dict`` silenced while it runs."""
    silenced = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
    previous = {name: module.__dict__.get(name) for name in silenced}
    module.__dict__.update(silenced)
    try:
        out = module.training_step(batch, 0)
    finally:
        for name, value in previous.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise MeasurementError("`training_step` returned no loss tensor; pass `loss_fn=` to the callback.")
    return out


class MeasurementCallback(Callback):
    """Base of the measurement callbacks (not used directly).

    Args:
        every_n_train_steps: measure after every ``n`` optimizer steps.
        every_n_epochs: measure at the end of every ``n``-th training epoch (give exactly one schedule).
        num_batches: probe batches taken once from the train loader and re-used at every measurement.
        loss_fn: ``loss_fn(module, batch) -> scalar``; default the module's ``training_step``.
        hvp_method: Hessian-vector product method (see ``functional.HVP_METHODS``).
        eval_mode: measure with the module in eval mode (BatchNorm statistics, no dropout).
        seed: seeds the callback's own generator (probe vectors, directions) and the probe draw.
        strict: re-raise a failed measurement instead of warning and skipping it.
    """

    prefix = "measurement"

    def __init__(
        self,
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        num_batches: int = 1,
        loss_fn: LossFn | None = None,
        hvp_method: str = "auto",
        eval_mode: bool = True,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        check_positive_int("every_n_train_steps", every_n_train_steps, allow_none=True)
        check_positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        if (every_n_train_steps is None) == (every_n_epochs is None):
            raise ValueError(
                "Give exactly one schedule: `every_n_train_steps` or `every_n_epochs` "
                f"(got every_n_train_steps={every_n_train_steps}, every_n_epochs={every_n_epochs})."
            )
        check_positive_int("num_batches", num_batches)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(module, batch) or None, got {loss_fn!r}.")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"`hvp_method` must be one of {HVP_METHODS}, got {hvp_method!r}.")
        check_bool("eval_mode", eval_mode)
        check_bool("strict", strict)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.num_batches = num_batches
        self.loss_fn = loss_fn
        self.hvp_method = hvp_method
        self.eval_mode = eval_mode
        self.seed = seed
        self.strict = strict
        self.generator = torch.Generator().manual_seed(seed)
        self.last_metrics: dict[str, float] = {}
        self._probe: list[Any] | None = None
        self._val_probe: list[Any] | None = None
        self._val_taken = False
        self._last_step = -1
        self._last_epoch = -1
        self._logger = MeasurementLogger(type(self).__name__)
        self._resolved_method: str | None = None

    # ------------------------------------------------------------------ identity and state
    #: attributes that tell two instances of one callback class apart in a checkpoint
    state_key_fields: tuple[str, ...] = ("every_n_train_steps", "every_n_epochs", "seed")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**{name: getattr(self, name) for name in self.state_key_fields})

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "last_epoch": self._last_epoch,
            "generator": self.generator.get_state(),
            "hvp_method": self._resolved_method,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
        self._last_epoch = state_dict["last_epoch"]
        self.generator.set_state(state_dict["generator"])
        self._resolved_method = state_dict.get("hvp_method")

    # ------------------------------------------------------------------ environment
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if strategy in _UNSUPPORTED_STRATEGIES:
            raise RuntimeError(
                f"{type(self).__name__} does not support {strategy}: parameters are sharded, so Hessian and "
                "landscape measurements would be wrong or hang. Use strategy='ddp' or a single device."
            )
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__}: the module uses manual optimization, so its `training_step` steps the "
                "optimizers and cannot serve as the loss; pass `loss_fn=`."
            )

    def _take_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        loader = _first_loader(trainer.train_dataloader)
        if loader is None:
            raise MeasurementError("no train dataloader to take probe batches from")
        return self._to_device(trainer, take_batches(loader, self.num_batches, seed=self.seed))

    def val_probe(self, trainer: pl.Trainer) -> list[Any] | None:
        """The validation probe set, taken once on first use (``None`` without a val loader)."""
        if not self._val_taken:
            self._val_probe, self._val_taken = self.take_val_probe(trainer), True
        return self._val_probe

    def take_val_probe(self, trainer: pl.Trainer) -> list[Any] | None:
        """``num_batches`` fixed batches of the (first) validation loader, or ``None`` if there is none."""
        loader = _first_loader(trainer.val_dataloaders)
        if loader is None:
            val_loop = trainer.fit_loop.epoch_loop.val_loop
            try:
                val_loop.setup_data()
            except Exception:  # no val loader configured is a normal case
                return None
            loader = _first_loader(trainer.val_dataloaders)
        if loader is None:
            return None
        batches = take_batches(loader, self.num_batches, seed=self.seed)
        return self._to_device(trainer, batches) if batches else None

    @staticmethod
    def _to_device(trainer: pl.Trainer, batches: Sequence[Any]) -> list[Any]:
        with torch.inference_mode(False):
            moved = [trainer.strategy.batch_to_device(b) for b in batches]
            return [apply_to_tensors(b, clone_if_inference) for b in moved]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._probe is None:
            self._probe = self._take_probe(trainer, pl_module)

    # ------------------------------------------------------------------ schedule
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 and step != self._last_step:
            self._last_step = step
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and epoch != self._last_epoch:
            self._last_epoch = epoch
            self._run(trainer, pl_module)

    # ------------------------------------------------------------------ measuring
    @property
    def resolved_loss_fn(self) -> LossFn:
        """The loss in use: the given ``loss_fn``, else the module's ``training_step``."""
        return self.loss_fn or training_step_loss

    @staticmethod
    def reduce_fn(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        """Sum across processes through the trainer's strategy (``None`` on one process)."""
        if trainer.world_size <= 1:
            return None

        def reduce_sum(t: Tensor) -> Tensor:
            return trainer.strategy.reduce(t, reduce_op="sum")

        return reduce_sum

    def operator(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: Sequence[Any]) -> LossOperator:
        """A loss operator over ``batches`` for the module, reducing across processes under DDP."""
        return LossOperator(
            pl_module,
            self.resolved_loss_fn,
            batches,
            hvp_method=self._resolved_method or self.hvp_method,
            eval_mode=self.eval_mode,
            reduce_fn=self.reduce_fn(trainer),
        )

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, float], dict[str, Figure]]:
        """Compute this callback's scalars and figures (full tags). Subclasses override.

        Scalar names without ``/`` get the callback's prefix; names containing ``/`` are full tags.
        """
        raise NotImplementedError

    def note_method(self, trainer: pl.Trainer, op: LossOperator) -> None:
        """Record which HVP method ran, once per run (in the console and TensorBoard's text tab)."""
        if op.method != "auto" and op.method != self._resolved_method:
            self._resolved_method = op.method
            message = f"{type(self).__name__}: Hessian-vector products by `{op.method}`."
            if op.method != "double_backward" and self.hvp_method == "auto":
                message += " (The model has an operation without double backward; fell back.)"
            rank_zero_info(message)
            self._logger.note(trainer, f"{self.prefix}/hvp_method", op.method)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._probe is None:
            self._probe = self._take_probe(trainer, pl_module)
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            scalars, figures = self.measure(trainer, pl_module)
            bad = [k for k, v in scalars.items() if not _finite(v)]
            if bad:
                raise MeasurementError(f"non-finite values for {', '.join(bad)}")
        except Exception as err:
            if self.strict:
                raise
            error, scalars, figures = err, {}, {}
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            error = error or MeasurementError("the measurement failed on another process")
        if error is not None:
            self._logger.warn_once(
                f"skip-{type(error).__name__}",
                f"skipped the measurement at step {trainer.global_step} ({type(error).__name__}: {error}). "
                "Training goes on; later measurements still run. Pass strict=True to raise instead.",
            )
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        metrics = {(k if "/" in k else f"{self.prefix}/{k}"): float(v) for k, v in scalars.items()}
        metrics[f"{self.prefix}/seconds"] = time.perf_counter() - start
        self.last_metrics = metrics
        self._logger.log(trainer, metrics, figures)


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _finite(value: float) -> bool:
    return bool(torch.isfinite(torch.tensor(float(value))))
