"""What every measurement callback shares: schedule, probe data, loss, DDP reduction, failures, logging.

Subclasses implement :meth:`MeasurementCallback.measure` (the math, through
:mod:`lightning_landscape.functional`) and return scalars and figures; this class decides
*when* they run, *on what data* and *where results go*.
"""

from __future__ import annotations

import ast
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_info
from torch import Tensor

from lightning_landscape._lightning import (
    LightningModule,
    Trainer,
    callback_bases,
    check_strategy,
    concrete_class,
    public_class,
    rebuild,
)
from lightning_landscape._user_state import invisible_user_code
from lightning_landscape.callbacks._budget import DEFAULT_MAX_OVERHEAD, OverheadBudget
from lightning_landscape.callbacks._logging import MeasurementLogger
from lightning_landscape.callbacks._probe import copy_batch, safe_to_draw, take_batches
from lightning_landscape.callbacks._progress import progress_note
from lightning_landscape.functional import HVP_METHODS, LossOperator, MeasurementError
from lightning_landscape.functional._batches import apply_to_tensors, batch_size, clone_if_inference
from lightning_landscape.functional._sharded import ShardedLossOperator, is_sharded

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LossFn = Callable[[torch.nn.Module, Any], Tensor]
#: Rough seconds to draw and log one figure, for the cost estimate before a callback's first measurement.
FIGURE_SECONDS = 0.2
#: The default probe size in samples: large enough that repeated measurements on the same weights agree to a few
#: percent (λ1 within 5–9%, trace 5–8% on the quickstart's CNN; see ``num_samples``).
DEFAULT_PROBE_SAMPLES = 256


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


def training_step_loss(module: LightningModule, batch: Any) -> Tensor:
    """The loss the module's own ``training_step`` returns (``out`` or ``out["loss"]``). Callers run it inside
    :func:`~lightning_landscape._user_state.invisible_user_code` (logging silenced, metrics and attributes kept):
    every measurement does, once around all of its calls."""
    out = module.training_step(batch, 0)
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise MeasurementError("`training_step` returned no loss tensor; pass `loss_fn=` to the callback.")
    return out


class MeasurementCallback(*callback_bases()):
    """Base of the measurement callbacks (not used directly).

    A subclass of the ``Callback`` of the Lightning package(s) the process has imported (``lightning.pytorch``,
    ``pytorch_lightning``, or both): a Trainer of either accepts it (:mod:`lightning_landscape._lightning`).

    Args:
        every_n_train_steps: measure after every ``n`` optimizer steps.
        every_n_epochs: measure at the end of every ``n``-th training epoch (give at most one schedule).
        max_overhead: with neither schedule, measure as often as keeps this callback's time (measuring,
            drawing, logging) at most this share of the fit's other wall time. ``None`` (default): the
            callbacks on one trainer that have neither schedule nor ``max_overhead`` share
            ``DEFAULT_MAX_OVERHEAD`` (5%) equally.
        num_samples: the probe's size in samples: the first batches of the train loader until they hold at least
            this many, taken once and re-used at every measurement. Default ``DEFAULT_PROBE_SAMPLES`` (256): on
            the quickstart's CNN with noisy labels, λ1 on disjoint 256-sample probes of the same weights varies by
            5–9% (coefficient of variation), the trace by 5–8% (``benchmarks/probe_size.py --label-noise 0.2``).
        num_batches: the probe's size in batches instead (give one of the two).
        loss_fn: ``loss_fn(module, batch) -> scalar``; default the module's ``training_step``.
        hvp_method: Hessian-vector product method (see ``functional.HVP_METHODS``).
        eval_mode: measure with the module in eval mode (BatchNorm statistics, no dropout).
        seed: seeds the callback's own generator (probe vectors, directions) and the probe draw.
        strict: re-raise a failed measurement instead of warning and skipping it.
    """

    prefix = "measurement"

    def __new__(cls, *args: Any, **kwargs: Any) -> MeasurementCallback:
        return object.__new__(concrete_class(cls))  # adds a Lightning package imported since this module was

    def __reduce__(self) -> tuple[Any, ...]:
        return rebuild, (public_class(self), dict(self.__dict__))

    def __init__(
        self,
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        max_overhead: float | None = None,
        num_batches: int | None = None,
        num_samples: int | None = None,
        loss_fn: LossFn | None = None,
        hvp_method: str = "auto",
        eval_mode: bool = True,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        check_positive_int("every_n_train_steps", every_n_train_steps, allow_none=True)
        check_positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise ValueError(
                "Give at most one schedule: `every_n_train_steps` or `every_n_epochs`, or neither to measure "
                f"within a share of the wall time (got every_n_train_steps={every_n_train_steps}, "
                f"every_n_epochs={every_n_epochs})."
            )
        if max_overhead is not None:
            if every_n_train_steps is not None or every_n_epochs is not None:
                raise ValueError(
                    "`max_overhead` budgets the default schedule; it cannot be combined with "
                    "`every_n_train_steps` or `every_n_epochs` (give one of the three)."
                )
            if (
                isinstance(max_overhead, bool)
                or not isinstance(max_overhead, (int, float))
                or not 0 < max_overhead <= 1
            ):
                raise ValueError(f"`max_overhead` must be a number in (0, 1] or None, got {max_overhead!r}.")
        check_positive_int("num_batches", num_batches, allow_none=True)
        check_positive_int("num_samples", num_samples, allow_none=True)
        if num_batches is not None and num_samples is not None:
            raise ValueError(
                f"Give the probe's size once: `num_samples` or `num_batches` (got num_samples={num_samples}, "
                f"num_batches={num_batches})."
            )
        if num_batches is None and num_samples is None:
            num_samples = DEFAULT_PROBE_SAMPLES
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(module, batch) or None, got {loss_fn!r}.")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"`hvp_method` must be one of {HVP_METHODS}, got {hvp_method!r}.")
        check_bool("eval_mode", eval_mode)
        check_bool("strict", strict)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"`seed` must be an integer in [0, 2**64 - 1] (a torch.Generator seed), got {seed!r}.")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.num_batches = num_batches
        self.num_samples = num_samples
        self.loss_fn = loss_fn
        self.hvp_method = hvp_method
        self.eval_mode = eval_mode
        self.seed = seed
        self.strict = strict
        self.generator = torch.Generator().manual_seed(seed)
        self.last_metrics: dict[str, float] = {}
        self._probe: list[Any] | None = None
        self._collecting: list[Any] | None = None  # train batches copied as they pass, until num_batches
        self._val_probe: list[Any] | None = None
        self._val_collecting: list[Any] | None = None
        self._val_taken = False
        self._validated = False  # the exact-product check ran once (LossOperator(validate=...))
        self._measured_in_fit = 0
        self._fit_steps: list[int] = []  # steps measured in this fit (the summary at its end)
        self._fit_skipped: list[int] = []  # of those, the ones whose measurement failed and was skipped
        self._posthoc_batches: list[Any] = []  # trainer.validate() / test(): batches for one measurement
        self._countdown = [0]  # batches until on_train_batch_end next reads the optimizer step
        self._last_step = -1
        self._last_epoch = -1
        self._logger = MeasurementLogger(type(self).__name__)
        self._resolved_method: str | None = None
        self._budget: OverheadBudget | None = None
        self._restored_cost: float | None = None
        self._siblings: list[MeasurementCallback] = []
        self._fixed_spent = 0.0  # with every_n_*: this fit's measuring, drawing, logging (the budget keeps its own)
        self._cost_estimate: float | None = None
        self._checkpoint_step: int | None = None  # validate/test from a checkpoint: the step measurements log at
        self._log_step: int | None = None  # while measuring post hoc: that step (None: the trainer's global_step)

    @property
    def _spent_seconds(self) -> float:
        """Seconds this callback spent in this fit measuring, drawing and logging (read by budgeted siblings)."""
        return self._budget.spent if self._budget is not None else self._fixed_spent

    @property
    def budgeted(self) -> bool:
        """Whether this callback has the default schedule (no ``every_n_*``: a share of the wall time)."""
        return self.every_n_train_steps is None and self.every_n_epochs is None

    # ------------------------------------------------------------------ identity and state
    #: attributes that tell two instances of one callback class apart in a checkpoint
    state_key_fields: tuple[str, ...] = ("every_n_train_steps", "every_n_epochs", "max_overhead", "seed")

    @property
    def state_key(self) -> str:
        # Lightning reads this at every hook call (to label its profiler's sections), about 20 times a
        # training step: build the string once, again only after one of its fields is set.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._generate_state_key(**{name: getattr(self, name) for name in self.state_key_fields})
            self.__dict__["_state_key"] = key
        return key

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.state_key_fields:
            self.__dict__.pop("_state_key", None)
        super().__setattr__(name, value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "last_epoch": self._last_epoch,
            "generator": self.generator.get_state(),
            "hvp_method": self._resolved_method,
            "last_cost": None if self._budget is None else self._budget.last_cost,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
        self._last_epoch = state_dict["last_epoch"]
        self.generator.set_state(state_dict["generator"])
        self._resolved_method = state_dict.get("hvp_method")
        self._restored_cost = state_dict.get("last_cost")
        if self._budget is not None and self._restored_cost is not None:  # Lightning restores after `setup`
            self._budget.last_cost = self._restored_cost

    # ------------------------------------------------------------------ environment
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(type(self).__name__, trainer.strategy)
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__}: the module uses manual optimization, so its `training_step` steps the "
                "optimizers and cannot serve as the loss; pass `loss_fn=`."
            )
        self._siblings = [cb for cb in trainer.callbacks if isinstance(cb, MeasurementCallback)]
        if self.budgeted:
            share = self.max_overhead
            if share is None:
                sharing = [cb for cb in self._siblings if cb.budgeted and cb.max_overhead is None]
                share = DEFAULT_MAX_OVERHEAD / max(len(sharing), 1)
            self._budget = OverheadBudget(share=share, last_cost=self._restored_cost)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after `configure_model`: the parameters exist now, so arguments that depend on them are checked here
        self.check_model(pl_module)

    def check_model(self, pl_module: LightningModule) -> None:
        """Raise a ``ValueError`` naming the argument if this callback's arguments do not fit the model."""
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise ValueError(f"{type(self).__name__}: the module has no parameter with requires_grad to measure.")
        method = getattr(self, "hvp_method", "auto")
        if method not in ("auto", "finite_difference") and is_sharded(pl_module):
            raise ValueError(
                f"{type(self).__name__}: `hvp_method` must be 'auto' or 'finite_difference' for a sharded (FSDP2) "
                f"module: double backward does not run under FSDP; got {method!r}."
            )

    #: ``blocks=`` of the callbacks that take it, and what it resolved to on the module (at fit start)
    blocks: Any = None
    _block_params: dict[str, list[str]] | None = None

    def _blocks_of(self, pl_module: LightningModule) -> dict[str, list[str]]:
        """``{block: parameter names}`` of ``blocks=`` (none without it), resolved by :meth:`check_model` at fit
        start, or now when measuring post hoc (validate/test has no fit start)."""
        if self.blocks is None:
            return {}
        if self._block_params is None:
            self.check_model(pl_module)
        return self._block_params or {}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """Say so when the checkpoint holds this callback's state under other arguments (it is then not restored).
        Under ``validate`` / ``test`` it notes the checkpoint's ``global_step``: the post-hoc measurement is logged
        there (Lightning restores the weights, not the loops, so the trainer's own ``global_step`` is 0)."""
        if _fn(trainer) != "fit":
            self._checkpoint_step = checkpoint.get("global_step")
        saved = [k for k in checkpoint.get("callbacks", {}) if isinstance(k, str) and k.startswith(type(self).__name__)]
        if not saved or self.state_key in saved:
            return
        claimed = {cb.state_key for cb in trainer.callbacks if type(cb) is type(self)}
        unclaimed = [k for k in saved if k not in claimed and k.startswith(type(self).__name__ + "{")]
        if not unclaimed:
            return
        mine = {name: getattr(self, name) for name in self.state_key_fields}
        diffs = []
        for key in unclaimed:
            try:
                theirs = ast.literal_eval(key[len(type(self).__name__) :])
            except (ValueError, SyntaxError):
                theirs = {}
            changed = [f"{n}: {theirs[n]!r} -> {v!r}" for n, v in mine.items() if n in theirs and theirs[n] != v]
            diffs.append(", ".join(changed) or key)
        self._logger.warn_once(
            "resume-arguments",
            f"the checkpoint holds this callback's state under other arguments ({'; '.join(diffs)}), so it was not "
            f"restored: {self.dropped_state_description()} start afresh. Resume with the same arguments to keep them.",
        )

    def dropped_state_description(self) -> str:
        """What is lost when a checkpoint's state cannot be restored (for the resume warning)."""
        return "the schedule's position, the random generator and the cost of the last measurement"

    def _take_probe(self, trainer: Trainer, pl_module: LightningModule) -> list[Any] | None:
        """The train probe drawn now if the loader allows it (:func:`safe_to_draw`); otherwise ``None`` and the
        batches are copied as the loop yields them."""
        loader = trainer.train_dataloader
        if safe_to_draw(loader):
            shared = self._sibling_probe("_probe")
            if shared is not None:  # the same batches another callback drew: one copy on the device, one draw
                return shared
            return take_batches(loader, self.probe_complete, seed=self.seed, transform=_loop_transform(trainer, 0))
        if self._collecting is None:
            self._collecting = []
        return None

    def val_probe(self, trainer: Trainer) -> list[Any] | None:
        """The validation probe set: drawn once on first use from a loader that allows it, else the first
        ``num_batches`` batches of the first validation loader copied as they passed (``None`` until then, and
        without a validation loader)."""
        if not self._val_taken:
            self._val_taken = True
            self._val_probe = self.take_val_probe(trainer)
        if self._val_probe is None and self._val_collecting:  # a validation run ended with fewer batches
            if not trainer.validating and not trainer.sanity_checking:
                self._val_probe, self._val_collecting = self._val_collecting, None
        return self._val_probe

    def take_val_probe(self, trainer: Trainer) -> list[Any] | None:
        """``num_batches`` fixed batches of the (first) validation loader drawn now if it allows it
        (:func:`safe_to_draw`); ``None`` otherwise (then they are copied as validation yields them)."""
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
        if not safe_to_draw(loader):
            if self._val_collecting is None:
                self._val_collecting = []
            return None
        shared = self._sibling_probe("_val_probe")
        if shared is not None:
            return shared
        batches = take_batches(loader, self.probe_complete, seed=self.seed, transform=_loop_transform(trainer, 0))
        return batches or None

    def _sibling_probe(self, attribute: str) -> list[Any] | None:
        """A probe another callback on this trainer drew with the same ``num_batches`` and ``seed`` (so the same
        batches), if there is one."""
        for cb in self._siblings:
            probe = getattr(cb, attribute)
            same = (cb.num_batches, cb.num_samples, cb.seed) == (self.num_batches, self.num_samples, self.seed)
            if cb is not self and probe is not None and same:
                return probe
        return None

    def probe_complete(self, batches: Sequence[Any]) -> bool:
        """Whether ``batches`` make a whole probe: ``num_batches`` of them, or at least ``num_samples`` samples."""
        if self.num_batches is not None:
            return len(batches) >= self.num_batches
        return sum(batch_size(b) for b in batches) >= self.num_samples

    @property
    def probe_size(self) -> str:
        """The probe's size in words (for messages)."""
        if self.num_batches is not None:
            return f"{self.num_batches} batch(es)"
        return f"{self.num_samples} samples"

    @property
    def needs_val_probe(self) -> bool:
        """Whether measurements use validation batches (then they are collected as validation runs)."""
        return False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._probe is None:
            self._probe = self._take_probe(trainer, pl_module)
        self._fixed_spent = 0.0
        self._measured_in_fit = 0
        self._fit_steps, self._fit_skipped = [], []
        self._countdown = [0]  # read the step at the first batch
        if self._budget is not None:
            self._budget.start(time.perf_counter(), trainer.global_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        collecting = self._collecting
        if collecting is not None:
            collecting.append(copy_batch(batch))
            if self.probe_complete(collecting):
                self._probe, self._collecting = collecting, None

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if _fn(trainer) == "validate":  # trainer.validate(): a post-hoc measurement on these batches
            self._collect_posthoc(trainer, batch, dataloader_idx)
            return
        if self.needs_val_probe and not self._val_taken:
            self.val_probe(trainer)  # decides: drawn now (a loader that allows it) or copied from here on
        collecting = self._val_collecting
        if collecting is not None and dataloader_idx == 0:
            collecting.append(copy_batch(batch))
            if self.probe_complete(collecting):
                self._val_probe, self._val_collecting = collecting, None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if self.budgeted and self._probe is not None and step > 0 and step != self._last_step:
            self._last_step = step  # the default schedule ends the fit with a frame of the final weights
            self._run(trainer, pl_module)
        if self._fit_steps:
            seconds = self._spent_seconds
            done = list(self._fit_steps)
            for s in self._fit_skipped:
                done.remove(s)
            skipped = (
                f"{len(self._fit_skipped)} skipped (a warning said why), at step(s) {_steps(self._fit_skipped)}; "
                if self._fit_skipped
                else ""
            )
            rank_zero_info(
                f"{type(self).__name__}: {len(done)} measurement(s) in this fit, at step(s) {_steps(done)}; "
                f"{skipped}{seconds:.1f} s in all."
                + (
                    " For more frames give a larger max_overhead, or every_n_epochs / every_n_train_steps."
                    if self.budgeted
                    else ""
                )
            )
        if self._measured_in_fit or trainer.sanity_checking:
            return
        if self._probe is None:
            why = f"the probe set was not complete ({self.probe_size} are copied from training as they pass)"
        elif self.every_n_train_steps is not None:
            why = f"every_n_train_steps={self.every_n_train_steps} and training ended at step {step}"
        elif self.every_n_epochs is not None:
            why = f"every_n_epochs={self.every_n_epochs} and training ended after {trainer.current_epoch} epoch(s)"
        else:
            why = f"the fit ended at step {step}, before a measurement could be made"
        self._logger.warn_once("no-measurement", f"no measurement was made in this fit: {why}.")

    # ------------------------------------------------------------------ after the fact: validate / test
    def _collect_posthoc(self, trainer: Trainer, batch: Any, dataloader_idx: int) -> None:
        """Copy the first ``num_batches`` batches of ``trainer.validate()`` / ``trainer.test()`` (loader 0)."""
        if dataloader_idx == 0 and not self.probe_complete(self._posthoc_batches):
            self._posthoc_batches.append(copy_batch(batch))

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._collect_posthoc(trainer, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _fn(trainer) == "validate":
            self._measure_posthoc(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _fn(trainer) == "test":
            self._measure_posthoc(trainer, pl_module)

    def _measure_posthoc(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Under ``trainer.validate()`` / ``trainer.test()`` (no fit): one measurement on the first ``num_batches``
        batches that loop evaluated (post-hoc use of a checkpoint), logged at the checkpoint's ``global_step`` when
        the loop loaded one (``ckpt_path=``), else at the trainer's."""
        batches, self._posthoc_batches = self._posthoc_batches, []
        if not batches:
            return
        saved = (self._probe, self._val_probe, self._val_taken, self._budget, self._last_step)
        self._probe, self._val_probe, self._val_taken, self._budget = batches, None, True, None
        self._log_step = self._checkpoint_step
        try:
            rank_zero_info(
                f"{type(self).__name__}: measuring once on {len(batches)} batch(es) of trainer.{_fn(trainer)}()."
            )
            self._run(trainer, pl_module)
        finally:
            self._probe, self._val_probe, self._val_taken, self._budget, self._last_step = saved
            self._log_step = self._checkpoint_step = None  # a later validate() without a checkpoint logs at its step

    # ------------------------------------------------------------------ schedule
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # An idle step must cost what an empty callback's does: count batches down to the next step that can be
        # due (a batch advances the optimizer step by at most one, so this never skips one), reading the trainer
        # only then.
        countdown = self._countdown  # a one-element list: no attribute assignment (our __setattr__) per step
        countdown[0] -= 1
        if countdown[0] > 0:
            return
        step = trainer.global_step
        if self._budget is not None:
            if step > 0 and step != self._last_step and self._budget.due(step):
                self._check_budget(trainer, pl_module, step)
            countdown[0] = self._budget.next_check - step
        elif self.every_n_train_steps:
            if step > 0 and step % self.every_n_train_steps == 0 and step != self._last_step:
                self._last_step = step
                self._run(trainer, pl_module)
            countdown[0] = self.every_n_train_steps - step % self.every_n_train_steps
        else:
            countdown[0] = 2**62  # measured at epoch ends only

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._collecting:  # an epoch shorter than num_batches: the probe is what it yielded
            self._probe, self._collecting = self._collecting, None
            rank_zero_info(
                f"{type(self).__name__}: the first epoch held fewer than the probe's {self.probe_size}; the probe "
                f"set is its {len(self._probe)} batches (the whole training set)."
            )
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and epoch != self._last_epoch:
            self._last_epoch = epoch
            self._run(trainer, pl_module)
        budget = self._budget
        step = trainer.global_step
        if budget is not None and budget.last_cost is None and self._probe is not None and step != self._last_step:
            # the default schedule's first frame comes at the end of the first epoch at the latest
            self._last_step = step
            self._run(trainer, pl_module)
            self._plan(trainer, step, None)

    def _check_budget(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """A check of the default schedule: measure if the budget pays for it, then plan the next check.

        Decisions and plans are rank zero's, broadcast, so that every rank measures at the same steps.
        """
        budget = self._budget
        assert budget is not None
        if self._probe is None:  # still copying probe batches from the loop: check again at the next step
            budget.next_check = step + 1
            return
        estimate = None
        if budget.last_cost is None:
            if self._cost_estimate is None:
                self._cost_estimate = self._estimate_cost(trainer, pl_module)
            estimate = self._cost_estimate
        measure = budget.should_measure(time.perf_counter(), self._others_spent(), estimate)
        if trainer.world_size > 1:
            measure = trainer.strategy.broadcast(measure, src=0)
        if measure:
            self._last_step = step
            self._run(trainer, pl_module)
        self._plan(trainer, step, estimate)

    def _plan(self, trainer: Trainer, step: int, estimate: float | None) -> None:
        """Set the budget's next check step (rank zero's plan, broadcast) and the countdown to it."""
        budget = self._budget
        next_check = budget.plan(time.perf_counter(), step, self._others_spent(), estimate)
        if trainer.world_size > 1:
            next_check = budget.next_check = trainer.strategy.broadcast(next_check, src=0)
        self._countdown[0] = next_check - step

    def _others_spent(self) -> float:
        return sum(cb._spent_seconds for cb in self._siblings if cb is not self)

    def _estimate_cost(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """Seconds a measurement should take, before the first: one timed probe gradient times
        :meth:`work_in_gradients`, plus :data:`FIGURE_SECONDS` per figure (rank zero draws them)."""
        _synchronize(pl_module)
        start = time.perf_counter()
        try:
            with self.operator(trainer, pl_module, self._probe) as op, invisible_user_code(pl_module):
                op.gradient()
        except Exception:  # the measurement itself will fail and say why; the time is still a cost
            pass
        _synchronize(pl_module)
        seconds = time.perf_counter() - start
        if self._budget is not None:  # only the default schedule estimates
            self._budget.spent += seconds
        return seconds * self.work_in_gradients() + FIGURE_SECONDS * self.figures_per_measurement()

    def work_in_gradients(self) -> float:
        """Rough cost of one measurement in probe-set gradients (a forward pass ≈ 1/3, an HVP ≈ 2)."""
        return 10.0

    def figures_per_measurement(self) -> int:
        """How many figures a measurement draws."""
        return 0

    # ------------------------------------------------------------------ measuring
    @property
    def resolved_loss_fn(self) -> LossFn:
        """The loss in use: the given ``loss_fn``, else the module's ``training_step``."""
        return self.loss_fn or training_step_loss

    @staticmethod
    def reduce_fn(trainer: Trainer) -> Callable[[Tensor], Tensor] | None:
        """Sum across processes through the trainer's strategy (``None`` on one process)."""
        if trainer.world_size <= 1:
            return None

        def reduce_sum(t: Tensor) -> Tensor:
            return trainer.strategy.reduce(t, reduce_op="sum")

        return reduce_sum

    def operator(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batches: Sequence[Any],
        params: Sequence[str] | None = None,
    ) -> LossOperator:
        """A loss operator over ``batches`` for the module (``params``: those parameters only; default all that
        require grad), reducing across processes under DDP; for an FSDP2-sharded module (``ModelParallelStrategy``)
        the sharded operator (local shards, finite-difference products)."""
        if is_sharded(pl_module):
            return ShardedLossOperator(
                pl_module, self.resolved_loss_fn, batches, params, hvp_method=self.hvp_method, eval_mode=self.eval_mode
            )
        return LossOperator(
            pl_module,
            self.resolved_loss_fn,
            batches,
            params,
            hvp_method=self.hvp_method,
            auto_method=self._resolved_method if self.hvp_method == "auto" else None,
            eval_mode=self.eval_mode,
            reduce_fn=self.reduce_fn(trainer),
            validate=not self._validated,
        )

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, float], dict[str, Figure]]:
        """Compute this callback's scalars and figures (full tags). Subclasses override.

        Scalar names without ``/`` get the callback's prefix; names containing ``/`` are full tags.
        """
        raise NotImplementedError

    def note_method(self, trainer: Trainer, op: LossOperator) -> None:
        """Record which HVP method ran and what the exact-product check found, once per run (in the console and
        TensorBoard's text tab); an explicitly chosen method that failed the check warns once."""
        if op.product_check:
            self._validated = True
        if op.method != "auto" and op.method != self._resolved_method:
            self._resolved_method = op.method
            message = f"{type(self).__name__}: Hessian-vector products by `{op.method}`."
            if op.space.distributed:
                message += " (The model is sharded (FSDP2): differences of gradients; FSDP has no double backward.)"
            elif getattr(op, "memory_fallback", False):
                message += " (Double backward ran out of memory even on small pieces of the probe; fell back.)"
            elif self.hvp_method == "auto" and op.product_check_failed:
                message += f" (The exact product failed its check: {op.product_check}.)"
            elif op.method != "double_backward" and self.hvp_method == "auto":
                message += " (The model has an operation without double backward; fell back.)"
            elif op.product_check:
                message += f" Product check {op.product_check}."
            rank_zero_info(message)
            self._logger.note(trainer, f"{self.prefix}/hvp_method", message)
        if op.product_check_failed and self.hvp_method != "auto":
            self._logger.warn_once(
                "product-check",
                f"hvp_method={self.hvp_method!r} gives a wrong Hessian-vector product for this model "
                f"({op.product_check}); use hvp_method='auto' (which then uses finite differences) or "
                "'finite_difference'.",
            )

    def _run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._probe is None:
            self._logger.warn_once(
                "probe-not-ready",
                f"a measurement was due at step {trainer.global_step} before the probe set was complete (its "
                f"{self.probe_size} are copied from the first training batches as they pass); skipped.",
            )
            return
        self._measured_in_fit += 1  # attempted: a failure is said by its own warning
        self._fit_steps.append(trainer.global_step)
        _synchronize(pl_module)  # queued training work is training time, not ours
        start = time.perf_counter()
        try:
            with progress_note(trainer, f"measuring {self.prefix}…"):
                self._measure_and_log(trainer, pl_module, start)
        finally:
            end = time.perf_counter()
            if self._budget is not None:
                self._budget.measured(end, self._others_spent(), end - start)
            else:
                self._fixed_spent += end - start

    def _measure_and_log(self, trainer: Trainer, pl_module: LightningModule, start: float) -> None:
        error: BaseException | None = None
        try:
            with invisible_user_code(pl_module), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*wrong Hessian-vector product.*")  # said once, below
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
            self._fit_skipped.append(trainer.global_step)
            self._logger.warn_once(
                f"skip-{type(error).__name__}",
                f"skipped the measurement at step {trainer.global_step} ({type(error).__name__}: {error}). "
                "Training goes on; later measurements still run. Pass strict=True to raise instead.",
            )
            return
        _synchronize(pl_module)
        metrics = {(k if "/" in k else f"{self.prefix}/{k}"): float(v) for k, v in scalars.items()}
        metrics[f"{self.prefix}/seconds"] = time.perf_counter() - start
        self.last_metrics = metrics
        self._logger.log(trainer, metrics, figures, step=self._log_step)


def _steps(steps: list[int]) -> str:
    """Steps for a summary line: the first 12, then an ellipsis."""
    return f"{', '.join(map(str, steps[:12]))}{' …' if len(steps) > 12 else ''}"


def _fn(trainer: Trainer) -> str:
    """What the trainer is running: "fit", "validate", "test" or "predict"."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return str(getattr(fn, "value", fn))


def _loop_transform(trainer: Trainer, dataloader_idx: int) -> Callable[[Any], Any]:
    """What the loop does to a batch before its step: precision conversion, the module's batch-transfer hooks,
    the move to the device (then autograd-safe copies of inference tensors)."""
    module = trainer.lightning_module

    def transform(batch: Any) -> Any:
        batch = trainer.precision_plugin.convert_input(batch)
        before = getattr(module, "_on_before_batch_transfer", None)
        if before is not None:
            batch = before(batch, dataloader_idx=dataloader_idx)
        with torch.inference_mode(False):
            batch = trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)
            return apply_to_tensors(batch, clone_if_inference)

    return transform


def _synchronize(pl_module: LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _finite(value: float) -> bool:
    return bool(torch.isfinite(torch.tensor(float(value))))
