"""``SAMMixin``: sharpness-aware minimization (SAM, Foret et al. 2021; ASAM, Kwon et al. 2021) by one flag.

Each SAM step of a module that mixes this in, with ``sam`` on (every optimizer step, or every k-th with
``sam_every_n_steps``):

1. Lightning's own closure runs ``training_step`` and ``backward`` at the weights ``w``: ``g = ∇L_B(w)``
   (``self.log`` calls count here, BatchNorm statistics move here; under DDP without the all-reduce);
2. ``ε = ρ·g/‖g‖₂`` (SAM) or ``ε = ρ·T²g/‖Tg‖₂`` with ``T = |w| + η`` (ASAM), over the perturbed parameters
   (``sam_params``; all by default) the optimizer holds that have a gradient
   (:func:`~lightning_landscape.functional._perturbation.ascent_step`, the same step worst-case sharpness starts with);
3. the closure runs again at ``w + ε`` with ``self.log`` silenced and module buffers, plain attributes and torchmetrics
   states left as the first pass made them: ``g_sam = ∇L_B(w + ε)`` for every parameter (under DDP all-reduced);
4. ``w`` is restored exactly (a copy, not ``w + ε - ε``) and Lightning carries on as always: precision
   plugin (unscaling, skipping non-finite steps), ``on_before_optimizer_step``, gradient clipping, then the
   user's optimizer steps with ``g_sam``; LR schedulers, ``global_step`` and checkpoints are untouched.

The variants (issue 17) are small pieces in :mod:`lightning_landscape._sam_variants`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_landscape._lightning import UNSUPPORTED_STRATEGIES, Trainer, check_strategy
from lightning_landscape._sam_variants import (
    ParamSelection,
    Reuse,
    ascent_norm,
    check_every_n_steps,
    check_rho,
    is_sam_step,
    rho_at,
)
from lightning_landscape._user_state import invisible_user_code
from lightning_landscape.functional._perturbation import ascent_step
from lightning_landscape.functional._sharded import local_shard, reshard

__all__ = ["SAMMixin"]


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


def _check_number(name: str, value: object, *, positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        accepted = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    return float(value)


class SAMMixin:
    """Sharpness-aware minimization for a ``LightningModule``, switched on by ``self.sam = True``.

    Mix it in first: before ``LightningModule`` (of either package, ``lightning.pytorch`` or
    ``pytorch_lightning``: the mixin subclasses neither), or before an existing ``LightningModule`` subclass
    (``class Mine(SAMMixin, ExistingModel)``); after it would leave Lightning's own ``optimizer_step`` in charge,
    so that order is a ``TypeError``. ``training_step`` and ``configure_optimizers`` stay as they are. The
    settings are constructor keywords (pass them on with ``**kwargs`` and ``LightningCLI`` sets them from YAML
    or the command line, ``--model.sam=true``) and attributes you may change at any time (e.g. SAM only for
    the last epochs); bad values raise when set.

    Args:
        sam: the flag. Off, training is bitwise the same as without the mixin.
        sam_rho: radius ``ρ`` of the perturbation.
        sam_adaptive: ASAM, ``ε = ρ·T²g/‖Tg‖₂`` with ``T = |w| + η`` (use a larger ``ρ``, e.g. 0.5 or 2).
        sam_eta: ``η`` of ASAM.
        sam_sync_first: under DDP, all-reduce the first gradient too, so every rank perturbs with the global
            gradient. Off (default), each rank perturbs with its own batch's gradient (the ``m``-sharpness of
            the SAM paper, and no extra communication); the second gradient is always all-reduced.
        sam_every_n_steps: ``k``: SAM on the k-th, 2k-th, … optimizer step only (``global_step + 1`` divisible by
            ``k``, as Lightning counts ``every_n_train_steps`` and ``log_every_n_steps``), plain steps between
            (MosaicML Composer's ``interval``). Derived from ``global_step``, so a resume is exact. ``1``: every step.
        sam_params: which parameters are perturbed: ``None`` (all), ``"norm"`` (the affine parameters of
            normalization layers, SAM-ON of Mueller et al. 2023: torch's BatchNorm*/LayerNorm/GroupNorm/
            InstanceNorm*/RMSNorm and any module class named ``…Norm``), a sequence of ``named_parameters()``
            names or glob patterns (``["encoder.*", "head.bias"]``), or a predicate ``(name, parameter) -> bool``.
            The others are not perturbed, ``‖g‖`` (and ASAM's ``T``) runs over the perturbed ones only, and every
            parameter steps with the gradient taken at ``w + ε``. So the first pass needs the perturbed ones'
            gradients only: the others do not require grad during it (backward skips their weight gradients;
            hooks there see ``.grad`` on the perturbed ones only), except under FSDP2, ``sam_sync_first`` DDP
            and ``sam_reuse``. Resolved at ``setup`` (a choice that selects nothing is an error there) and again
            only if the parameters are replaced; a predicate is called then, not at every step.
        sam_log: log on SAM steps only, on the step axis of your own ``self.log`` values: ``sam/sharpness``
            ``= L_B(w + ε) − L_B(w)`` (both losses the passes computed anyway), ``sam/grad_norm`` (the norm
            ``ε`` is scaled by: ``‖g‖₂``, or ``‖Tg‖₂`` for ASAM) and ``sam/rho``; under DDP rank zero's values.
            No host synchronisation in the step (tensors go to ``self.log``; the logger reads them when it
            writes). With ``Trainer(log_every_n_steps)`` a multiple of ``sam_every_n_steps``, every written step
            is a SAM step; otherwise the written steps that are not carry no ``sam/`` values.
        sam_reuse: LookSAM (Liu et al. 2022), with ``sam_every_n_steps > 1``: each SAM step keeps ``g_v``, the
            component of ``g_sam`` orthogonal to that step's ``g``; the plain steps between add
            ``α·‖g‖/‖g_v‖·g_v`` to their gradient ``g``. ``g_v`` (one gradient's memory) is saved in checkpoints
            (``on_save_checkpoint``; a class that overrides it must call ``super()``), so a resume between SAM
            steps is exact. Under DDP with per-rank ``ε``, ``g_v`` is averaged over the ranks (one all-reduce per
            SAM step). Not under FSDP2.
        sam_reuse_alpha: LookSAM's ``α``.

    ``sam_rho`` may be a schedule: a callable ``rho(global_step) -> float`` (e.g. a warm-up), called at each SAM
    step and checked there. The callable (like a ``sam_params`` predicate) is code, not state: checkpoints do not
    hold it (and ``save_hyperparameters`` can only pickle a module-level function); pass the same callable again
    when resuming (the value depends on ``global_step`` only, which is restored, so the resume is exact).

    What else holds with ``sam`` on:

    - precision ``32``, ``bf16-mixed``, ``16-mixed`` (the first gradient is unscaled before the norm; when it
      is not finite the step is skipped as ``GradScaler`` skips it), ``bf16-true``/``16-true``, ``64``;
    - ``Trainer(gradient_clip_val=...)`` clips ``g_sam``; ``on_before_optimizer_step`` sees ``g_sam``;
    - ``self.log`` in ``training_step`` (and in hooks during the backward) reports ``L(w)`` once per step;
      the step output passed to ``on_train_batch_end`` is the first pass's;
    - buffers (BatchNorm running statistics) and torchmetrics metrics called in ``training_step`` are
      updated once per step, by the first pass;
    - ``on_before_zero_grad``, ``optimizer_zero_grad``, ``on_before_backward`` and ``on_after_backward``
      run for both passes; :attr:`sam_perturbed` is ``True`` during the second;
    - plain Python attributes of the module and its submodules that ``training_step`` changes (counters, lists
      such as ``self.training_step_outputs``, dicts, sets) are as the first pass left them (the guard
      measurements use too: ``lightning_landscape._user_state``);
    - anything else ``training_step`` does (dropout masks, the global RNG, objects outside the module) happens twice.

    Gradient accumulation (``Trainer(accumulate_grad_batches=K)``): a SAM step is SAM on the whole window of
    ``K`` micro-batches, the same step as SAM on one batch ``K`` times larger: ``g`` is the gradient Lightning
    accumulated over the window at ``w``, one ``ε`` is formed from it, and the second pass runs ``training_step``
    and ``backward`` on every micro-batch of the window again at ``w + ε`` (the same ``loss / K`` scaling, under
    DDP with the all-reduce on the last one only). Why this and not one ``ε`` per micro-batch: accumulation exists
    to stand in for a batch that does not fit, and this keeps that promise (a run with ``K`` micro-batches of
    ``m`` matches one with batches of ``K·m``); ``m``-sharpness is available where it costs nothing, as
    per-process ``ε`` under DDP (``sam_sync_first=False``). The cost: the window's micro-batches are kept (the
    references the loop hands over, taken in :meth:`on_train_batch_start`: a class that overrides it must call
    ``super()``) until the optimizer step, and a SAM step still costs two forward-backward passes per
    micro-batch. ``sam/sharpness`` is then the last micro-batch's (the earlier ones' losses at ``w`` are gone).
    Not under FSDP2.

    Unsupported, with an error at ``setup``: manual optimization, FSDP1 (``FSDPStrategy``), DeepSpeed, tensor
    parallelism, XLA, and gradient accumulation under FSDP2. Under ``ModelParallelStrategy`` (FSDP2) ``ε`` is
    computed on each process's shards from the gradient FSDP has already averaged over the processes (``‖g‖``
    reduced across them), so it is ``sam_sync_first=True``'s SAM whatever that flag says: the per-process gradients
    are never whole anywhere.
    A class that overrides ``optimizer_step`` must call ``super().optimizer_step(...)``.

    Example:
        >>> import pytorch_lightning as pl
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Model(SAMMixin, pl.LightningModule):
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.net = torch.nn.Linear(4, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return torch.nn.functional.mse_loss(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> model = Model(sam=True, sam_rho=0.1)
        >>> model.sam, model.sam_rho, model.sam_adaptive
        (True, 0.1, False)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=4)
        >>> trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, accelerator="cpu")
        >>> trainer.fit(model, data)
        >>> trainer.global_step
        2
        >>> model.sam_rho = -1.0
        Traceback (most recent call last):
        ...
        ValueError: `sam_rho` must be a finite number > 0 or a callable step -> ρ, got -1.0.

        The variants: SAM on every 5th step, only normalization layers perturbed, ``ρ`` warmed up, logged:

        >>> model = Model(sam=True, sam_every_n_steps=5, sam_params="norm", sam_log=True,
        ...               sam_rho=lambda step: 0.05 * min(1.0, (step + 1) / 1000))
        >>> model.sam_every_n_steps, model.sam_params
        (5, 'norm')
    """

    # class-level defaults, so the properties work even before ``__init__`` has run
    _sam: bool = False
    _sam_rho: float = 0.05
    _sam_adaptive: bool = False
    _sam_eta: float = 0.01
    _sam_sync_first: bool = False
    _sam_every_n_steps: int = 1
    _sam_selection: ParamSelection = ParamSelection(None)
    _sam_log: bool = False
    _sam_reuse: bool = False
    _sam_reuse_alpha: float = 0.7
    _sam_reuse_state: Reuse | None = None  # LookSAM's g_v (an object: the second pass's guard leaves it alone)
    _sam_logged: tuple[str, ...] = ()  # keys of this step's sam/ values in Lightning's result collection
    _sam_perturbed: bool = False
    _sam_originals: dict[int, Tensor] | None = None  # during the second pass: id(tensor) -> its value at w
    _sam_window: _Window | None = None  # with accumulate_grad_batches > 1: this window's (batch_idx, batch) so far

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        first_module = next((i for i, c in enumerate(mro) if c.__name__ == "LightningModule"), None)
        if first_module is not None and first_module < mro.index(SAMMixin):
            raise TypeError(
                f"{cls.__name__}: put SAMMixin before the LightningModule in the bases "
                f"(class {cls.__name__}(SAMMixin, ...)); after it, Lightning's optimizer_step would run and SAM never."
            )

    def __init__(
        self,
        *args: Any,
        sam: bool = False,
        sam_rho: float | Callable[[int], float] = 0.05,
        sam_adaptive: bool = False,
        sam_eta: float = 0.01,
        sam_sync_first: bool = False,
        sam_every_n_steps: int = 1,
        sam_params: str | Sequence[str] | Callable[[str, Tensor], bool] | None = None,
        sam_log: bool = False,
        sam_reuse: bool = False,
        sam_reuse_alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sam = sam
        self.sam_rho = sam_rho
        self.sam_adaptive = sam_adaptive
        self.sam_eta = sam_eta
        self.sam_sync_first = sam_sync_first
        self.sam_every_n_steps = sam_every_n_steps
        self.sam_params = sam_params
        self.sam_log = sam_log
        self.sam_reuse = sam_reuse
        self.sam_reuse_alpha = sam_reuse_alpha

    # ------------------------------------------------------------------------------------------ settings
    @property
    def sam(self) -> bool:
        """Whether optimizer steps are SAM steps."""
        return self._sam

    @sam.setter
    def sam(self, value: bool) -> None:
        self._sam = _check_bool("sam", value)

    @property
    def sam_rho(self) -> float | Callable[[int], float]:
        """The radius ``ρ``: a number, or a schedule ``rho(global_step) -> float`` called at each SAM step."""
        return self._sam_rho

    @sam_rho.setter
    def sam_rho(self, value: float | Callable[[int], float]) -> None:
        self._sam_rho = check_rho(value)

    @property
    def sam_adaptive(self) -> bool:
        """ASAM (``T = |w| + η``) instead of SAM."""
        return self._sam_adaptive

    @sam_adaptive.setter
    def sam_adaptive(self, value: bool) -> None:
        self._sam_adaptive = _check_bool("sam_adaptive", value)

    @property
    def sam_eta(self) -> float:
        """``η`` of ASAM."""
        return self._sam_eta

    @sam_eta.setter
    def sam_eta(self, value: float) -> None:
        self._sam_eta = _check_number("sam_eta", value, positive=False)

    @property
    def sam_sync_first(self) -> bool:
        """Under DDP, all-reduce the first gradient too (all ranks perturb alike)."""
        return self._sam_sync_first

    @sam_sync_first.setter
    def sam_sync_first(self, value: bool) -> None:
        self._sam_sync_first = _check_bool("sam_sync_first", value)

    @property
    def sam_every_n_steps(self) -> int:
        """SAM on the k-th, 2k-th, … optimizer step (``global_step + 1`` divisible by k); plain steps between."""
        return self._sam_every_n_steps

    @sam_every_n_steps.setter
    def sam_every_n_steps(self, value: int) -> None:
        self._sam_every_n_steps = check_every_n_steps(value)

    @property
    def sam_params(self) -> str | Sequence[str] | Callable[[str, Tensor], bool] | None:
        """Which parameters are perturbed: ``None`` (all), ``"norm"``, names/globs (a tuple) or a predicate."""
        return self._sam_selection.spec

    @sam_params.setter
    def sam_params(self, value: str | Sequence[str] | Callable[[str, Tensor], bool] | None) -> None:
        self._sam_selection = ParamSelection(value)

    @property
    def sam_log(self) -> bool:
        """Log ``sam/sharpness``, ``sam/grad_norm`` and ``sam/rho`` on SAM steps."""
        return self._sam_log

    @sam_log.setter
    def sam_log(self, value: bool) -> None:
        self._sam_log = _check_bool("sam_log", value)

    @property
    def sam_reuse(self) -> bool:
        """LookSAM: plain steps between SAM steps reuse the last SAM gradient's orthogonal component."""
        return self._sam_reuse

    @sam_reuse.setter
    def sam_reuse(self, value: bool) -> None:
        self._sam_reuse = _check_bool("sam_reuse", value)
        if not value:
            self._sam_reuse_state = None

    @property
    def sam_reuse_alpha(self) -> float:
        """LookSAM's ``α``."""
        return self._sam_reuse_alpha

    @sam_reuse_alpha.setter
    def sam_reuse_alpha(self, value: float) -> None:
        self._sam_reuse_alpha = _check_number("sam_reuse_alpha", value, positive=False)

    @property
    def _sam_reusing(self) -> bool:
        """LookSAM is on and there are plain steps to reuse ``g_v`` on."""
        return self._sam_reuse and self._sam_every_n_steps > 1

    @property
    def sam_perturbed(self) -> bool:
        """``True`` while the second forward-backward runs at ``w + ε`` (for hooks that must tell)."""
        return self._sam_perturbed

    # ------------------------------------------------------------------------------------------- checks
    def setup(self, stage: str) -> None:
        """Checks the Trainer's configuration when ``sam`` is on (then calls ``super().setup``)."""
        if stage == "fit" and self.sam:
            self._sam_check(self.trainer)
            selection = self._sam_selection
            if not selection.all and next(iter(self.parameters()), None) is not None:  # else at the first SAM step
                selection.resolve(self)  # a ValueError if it selects nothing
                if selection.unmatched:
                    rank_zero_warn(f"`sam_params`: the patterns {selection.unmatched} match no parameter.")
            plugin = self.trainer.precision_plugin
            stepping = type(plugin).optimizer_step.__qualname__
            if stepping not in ("Precision.optimizer_step", "MixedPrecision.optimizer_step"):
                rank_zero_warn(f"SAMMixin is untested with the precision plugin {type(plugin).__name__}.")
            if (
                self.trainer.accumulate_grad_batches > 1
                and type(self).on_train_batch_start is not SAMMixin.on_train_batch_start
            ):
                rank_zero_warn(
                    f"{type(self).__name__} overrides `on_train_batch_start`: with accumulate_grad_batches > 1 it "
                    "must call `super().on_train_batch_start(batch, batch_idx)` (SAM keeps the window's micro-batches "
                    "there)."
                )
            if type(self).optimizer_step is not SAMMixin.optimizer_step:
                rank_zero_warn(
                    f"{type(self).__name__} overrides `optimizer_step`: SAM steps happen only if it calls "
                    "`super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)`."
                )
        super().setup(stage)

    def _sam_check(self, trainer: Trainer) -> None:
        if not self.automatic_optimization:
            raise ValueError(
                "SAMMixin needs automatic optimization (`self.automatic_optimization = True`); with manual "
                "optimization, turn `sam` off."
            )
        strategy = trainer.strategy
        names = {cls.__name__ for cls in type(strategy).__mro__}
        if trainer.accumulate_grad_batches != 1 and "ModelParallelStrategy" in names:
            raise ValueError(
                "SAMMixin does not support `Trainer(accumulate_grad_batches > 1)` under ModelParallelStrategy "
                f"(FSDP2) (got {trainer.accumulate_grad_batches}): use accumulate_grad_batches=1 there."
            )
        supported = {"SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy"}
        if names & set(UNSUPPORTED_STRATEGIES) or not names & supported:
            raise ValueError(
                f"SAMMixin supports single-device, DDP and ModelParallelStrategy (FSDP2) strategies, got "
                f"{type(strategy).__name__}; unsupported: {', '.join(UNSUPPORTED_STRATEGIES)}."
            )
        try:
            check_strategy("SAMMixin", strategy)  # tensor parallelism
        except RuntimeError as err:
            raise ValueError(str(err)) from None
        if len(trainer.optimizers) > 1:
            raise ValueError(f"SAMMixin supports one optimizer, got {len(trainer.optimizers)}.")
        if self.sam_reuse and "ModelParallelStrategy" in names:
            raise ValueError("`sam_reuse=True` is not supported under ModelParallelStrategy (FSDP2): turn it off.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning's hook: adds LookSAM's ``g_v`` (with ``sam_reuse``), so that a resume between SAM steps is exact.
        A class that overrides it must call ``super().on_save_checkpoint(checkpoint)``."""
        state = self._sam_reuse_state
        if state is not None and state.ready:
            names = {id(p): n for n, p in self.named_parameters()}
            checkpoint["SAMMixin"] = {"reuse": state.state_dict(names)}
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning's hook: restores LookSAM's ``g_v`` (a checkpoint without it clears it)."""
        saved = checkpoint.get("SAMMixin", {}).get("reuse")
        self._sam_reuse_state = None
        if saved:
            state = Reuse()
            state.load_state_dict(saved, dict(self.named_parameters()))
            self._sam_reuse_state = state
        super().on_load_checkpoint(checkpoint)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict``; during the second pass it holds the weights and buffers at ``w``, not ``w + ε``
        (so a checkpoint saved from a hook there is the same as one saved after the step's first pass)."""
        state = super().state_dict(*args, **kwargs)
        originals = self._sam_originals
        if originals:
            prefix = kwargs.get("prefix", "")
            named = [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]
            for name, t in named:
                if id(t) in originals and prefix + name in state:
                    state[prefix + name] = originals[id(t)].clone()
        return state

    # ------------------------------------------------------------------------------------------- the step
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        """Lightning's hook: with ``accumulate_grad_batches > 1``, keeps a reference to each micro-batch of the
        current window (SAM's second pass runs them again at ``w + ε``). A class that overrides it must call
        ``super().on_train_batch_start(batch, batch_idx)``."""
        trainer = getattr(self, "_trainer", None)
        accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
        if accumulate > 1:
            if batch_idx % accumulate == 0 or self._sam_window is None:
                self._sam_window = _Window()
            self._sam_window.items.append((batch_idx, batch))
        else:
            self._sam_window = None
        return super().on_train_batch_start(batch, batch_idx)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Lightning's hook; with ``sam`` on, the closure the optimizer calls is the SAM double pass on SAM steps
        (and on the others, with ``sam_reuse``, the plain pass plus LookSAM's reused component)."""
        sam_step = False
        if self.sam and optimizer_closure is not None:
            self._sam_check(self.trainer)
            if is_sam_step(self.trainer.global_step, self.sam_every_n_steps):
                sam_step = True
                earlier = self._sam_earlier_micro_batches(batch_idx)
                optimizer_closure = partial(self._sam_closure, optimizer, optimizer_closure, earlier)
            elif self.sam_reuse and self._sam_reuse_state is not None and self._sam_reuse_state.ready:
                optimizer_closure = partial(self._sam_reuse_closure, optimizer, optimizer_closure)
        if self._sam_logged and not sam_step:
            self._sam_unlog()
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            self._sam_window = None  # the window ends with its optimizer step: let its micro-batches go

    def _sam_earlier_micro_batches(self, batch_idx: int) -> list[tuple[int, Any]]:
        """The micro-batches of this accumulation window before the current one (none without accumulation)."""
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate == 1:
            return []
        window = self._sam_window.items if self._sam_window is not None else []
        expected = list(range(batch_idx - batch_idx % accumulate, batch_idx + 1))
        if [i for i, _ in window] != expected:
            raise RuntimeError(
                f"SAMMixin with accumulate_grad_batches={accumulate} needs every micro-batch of the window "
                f"(batch_idx {expected}), but on_train_batch_start kept {[i for i, _ in window]}: a class that "
                "overrides `on_train_batch_start` must call `super().on_train_batch_start(batch, batch_idx)`."
            )
        return window[:-1]

    def _sam_reuse_closure(self, optimizer: Any, closure: Callable[[], Any]) -> Any:
        loss = closure()
        if loss is not None:
            self._sam_reuse_state.apply(_params_with_grad(optimizer), self.sam_reuse_alpha)
        return loss

    def _sam_closure(self, optimizer: Any, closure: Callable[[], Any], earlier: Sequence[tuple[int, Any]] = ()) -> Any:
        trainer = self.trainer
        strategy = trainer.strategy
        per_rank = not self.sam_sync_first and trainer.world_size > 1 and _is_a(strategy, "ParallelStrategy")
        rho = rho_at(self._sam_rho, trainer.global_step)
        # a subset perturbed: the first pass needs the gradient of that subset only (every parameter steps with the
        # second pass's), so the others stop requiring grad for it and backward skips their weight gradients (not
        # under accumulation: the earlier micro-batches' first passes have already run with every gradient)
        local = trainer.world_size == 1 or per_rank
        first_pass_only = [] if earlier else self._sam_first_pass_params(optimizer, local=local)
        # first pass at w: Lightning's closure (training_step, zero_grad, backward, hooks, logging)
        try:
            for p in first_pass_only:
                p.requires_grad_(False)
            with strategy.block_backward_sync() if per_rank else contextlib.nullcontext():
                loss = closure()
        finally:
            for p in first_pass_only:
                p.requires_grad_(True)
        if loss is None:  # training_step returned None: no gradient, nothing to perturb
            return loss
        params = _params_with_grad(optimizer)
        if not params:
            return loss
        chosen = self._sam_selection.select(self, params)  # the perturbed ones (``params`` itself for all)
        if not chosen:
            return loss
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        bad = None
        # FSDP2: parameters and gradients are DTensor shards; ε is formed and applied on the local shards, with
        # ‖g‖ reduced over the processes (a parameter that is not sharded counts once)
        sharded = [_is_a(p, "DTensor") for p in chosen]
        reduce_squares = _shard_reducer(chosen, sharded) if any(sharded) else None
        with torch.no_grad():
            targets = [local_shard(p) for p in chosen] if any(sharded) else chosen
            everything = [local_shard(p.grad) for p in params] if any(sharded) else [p.grad for p in params]
            if scaler is not None:  # 16-mixed: unscale (these gradients are discarded) and note non-finite ones
                scale = getattr(scaler, "_scale", None)
                if not isinstance(scale, Tensor):
                    scale = torch.tensor(scaler.get_scale())
                torch._foreach_mul_(everything, scale.double().reciprocal().float().to(everything[0].device))
                bad = torch.stack([n.float() for n in torch._foreach_norm(everything)]).sum().isfinite().logical_not()
                if per_rank:  # every rank must skip the step together
                    bad = strategy.reduce(bad.float(), reduce_op="sum") > 0
            grads = everything if chosen is params else [local_shard(p.grad) for p in chosen]
            first = _copies(everything) if self._sam_reusing else None  # LookSAM needs g after the second pass
            weights = targets if self.sam_adaptive else None
            norm = None
            if self.sam_log:  # the norm ε is scaled by, for the log (no host sync)
                kw = dict(adaptive=self.sam_adaptive, eta=self.sam_eta, reduce_squares=reduce_squares)
                norm = ascent_norm(grads, weights, **kw)
            eps = ascent_step(
                grads,
                weights,
                rho,
                adaptive=self.sam_adaptive,
                eta=self.sam_eta,
                reduce_squares=reduce_squares,
            )
            saved = _copies([p.detach() for p in targets])
            if any(sharded):  # a module FSDP2 left unsharded would not see w + ε in the shards
                reshard(self)
            torch._foreach_add_(targets, eps)
            del eps, grads, everything
        # what state_dict() shows during the second pass (not for shards: it holds DTensors, the copies are local)
        originals = {} if any(sharded) else {id(p): w for p, w in zip(chosen, saved, strict=True)}
        try:  # second pass at w + ε: gradient all-reduced under DDP, no logging, buffers kept
            with self._sam_second_pass(originals):
                if earlier:  # accumulation: the window's earlier micro-batches at w + ε first, without the all-reduce
                    self._sam_replay(optimizer, earlier)
                if _is_a(closure, "AbstractClosure"):
                    perturbed_loss = closure.closure().loss  # keeps the first pass's result as the step's output
                else:
                    perturbed_loss = closure()
        finally:
            if any(sharded):
                reshard(self)
            with torch.no_grad():
                torch._foreach_copy_(targets, saved)
        if first is not None:
            mean = partial(strategy.reduce, reduce_op="mean") if per_rank else None  # g differs by rank
            self._sam_reuse_state = self._sam_reuse_state or Reuse()
            with torch.no_grad():
                self._sam_reuse_state.remember(params, first, mean=mean)
        if bad is not None:  # make GradScaler see the first pass's overflow: it skips the step
            _poison(params, bad)
        if norm is not None:  # outside the second pass: ``self.log`` is the user's again
            scale = trainer.accumulate_grad_batches  # Lightning's closure losses are divided by it
            self._sam_log_step(loss, perturbed_loss, norm, rho, scale=scale)
        return loss

    def _sam_replay(self, optimizer: Any, earlier: Sequence[tuple[int, Any]]) -> None:
        """Zeroes the gradients, then runs ``training_step`` and ``backward`` (the strategy's: precision plugin,
        hooks) on ``earlier`` micro-batches at the current (perturbed) weights, each loss divided by
        ``accumulate_grad_batches`` as Lightning's own closure divides it; under DDP without the all-reduce (the
        window's last backward, Lightning's closure, does it)."""
        trainer = self.trainer
        strategy = trainer.strategy
        self.on_before_zero_grad(optimizer)
        self.optimizer_zero_grad(trainer.current_epoch, earlier[0][0], optimizer)
        blocking = strategy.block_backward_sync() if _is_a(strategy, "ParallelStrategy") else contextlib.nullcontext()
        with blocking:
            for batch_idx, batch in earlier:
                output = strategy.training_step(batch, batch_idx)
                loss = output.get("loss") if isinstance(output, Mapping) else output
                if loss is None:  # training_step skipped this micro-batch: so does Lightning's first pass
                    continue
                strategy.backward(loss / trainer.accumulate_grad_batches, optimizer)

    def _sam_first_pass_params(self, optimizer: Any, *, local: bool) -> list[Tensor]:
        """The parameters that need no gradient in the first pass: those not perturbed, where the first pass's
        gradient stays on this process (single device, DDP's per-rank first pass; not FSDP2, whose hooks reduce
        every gradient) and LookSAM does not need it."""
        fsdp2 = _is_a(self.trainer.strategy, "ModelParallelStrategy")
        if self._sam_selection.all or self._sam_reusing or not local or fsdp2:
            return []
        candidates = [p for p in _optimizer_params(optimizer) if p.requires_grad]
        perturbed = {id(p) for p in self._sam_selection.select(self, candidates)}
        return [p for p in candidates if id(p) not in perturbed] if perturbed else []

    def _sam_log_step(
        self, loss: Tensor, perturbed_loss: Tensor | None, norm: Tensor, rho: float, *, scale: int = 1
    ) -> None:
        fx = getattr(self, "_current_fx_name", None)
        if fx is None or getattr(self, "_trainer", None) is None:  # not called by a Trainer: nothing to log to
            return
        values = {"sam/grad_norm": norm, "sam/rho": torch.full((), rho, device=norm.device)}
        if isinstance(loss, Tensor) and isinstance(perturbed_loss, Tensor):
            sharpness = perturbed_loss.detach() - loss.detach()
            values["sam/sharpness"] = sharpness * scale if scale != 1 else sharpness
        for name, value in values.items():
            self.log(name, value, on_step=True, on_epoch=False)
        self._sam_logged = tuple(f"{fx}.{name}" for name in values)

    def _sam_unlog(self) -> None:
        """Takes this mixin's ``sam/`` values out of Lightning's result collection, so that a step without SAM
        reports none (Lightning otherwise re-sends a step's last logged value at every later step of the epoch)."""
        keys, self._sam_logged = self._sam_logged, ()
        results = getattr(getattr(self, "_trainer", None), "_results", None)
        for key in keys:
            metric = results.get(key) if isinstance(results, dict) else None
            if metric is not None and hasattr(metric, "has_reset"):
                metric.reset()

    @contextlib.contextmanager
    def _sam_second_pass(self, originals: dict[int, Tensor]) -> Iterator[None]:
        buffers: dict[int, Tensor] = {}
        for m in self.modules():
            for b in m._buffers.values():
                if b is not None:
                    buffers[id(b)] = b
        with torch.no_grad():
            saved = list(zip(buffers.values(), _copies(list(buffers.values())), strict=True))
        originals.update((id(b), s) for b, s in saved)
        # the same guard measurements use: no logging, metrics frozen, plain attributes restored
        with invisible_user_code(self):
            self._sam_perturbed = True
            self._sam_originals = originals
            try:
                yield
            finally:
                self._sam_perturbed = False
                self._sam_originals = None
                if saved:
                    with torch.no_grad():
                        torch._foreach_copy_([b for b, _ in saved], [c for _, c in saved])


class _Window:
    """The ``(batch_idx, batch)`` micro-batches of one accumulation window (an object, not a plain list, so that the
    second pass's attribute guard neither copies nor compares it)."""

    def __init__(self) -> None:
        self.items: list[tuple[int, Any]] = []


def _is_a(obj: object, class_name: str) -> bool:
    """Whether ``obj``'s class or a base is named ``class_name`` (either Lightning package's class matches)."""
    return any(cls.__name__ == class_name for cls in type(obj).__mro__)


def _shard_reducer(params: list[Tensor], sharded: list[bool]) -> Callable[[Tensor], Tensor]:
    """``reduce_squares`` for :func:`ascent_step`: per-tensor squared norms of local shards → the global sum,
    all-reduced over the shards' process group (tensors held whole by every process counted once)."""
    mesh = next(p.device_mesh for p, s in zip(params, sharded, strict=True) if s)
    group = mesh.get_group()
    mask = torch.tensor(sharded)

    def reduce(squares: Tensor) -> Tensor:
        local = torch.stack([squares[mask.to(squares.device)].sum(), squares[~mask.to(squares.device)].sum()])
        shard_sum = local[:1].clone()
        torch.distributed.all_reduce(shard_sum, group=group)
        return shard_sum[0] + local[1]

    return reduce


def _copies(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` by one fused copy (per device and dtype) rather than one clone, one kernel, each."""
    copies = [torch.empty_like(t) for t in tensors]
    if copies:
        torch._foreach_copy_(copies, tensors)
    return copies


def _optimizer_params(optimizer: Any) -> list[Tensor]:
    """Every parameter the optimizer holds, each once, in the optimizer's order."""
    seen: set[int] = set()
    params = []
    for group in getattr(optimizer, "optimizer", optimizer).param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _params_with_grad(optimizer: Any) -> list[Tensor]:
    """Every parameter the optimizer holds that has a gradient, each once, in the optimizer's order."""
    seen: set[int] = set()
    params = []
    for group in getattr(optimizer, "optimizer", optimizer).param_groups:
        for p in group["params"]:
            if p.grad is not None and id(p) not in seen:
                if p.grad.is_sparse:
                    raise ValueError("SAMMixin does not support sparse gradients.")
                seen.add(id(p))
                params.append(p)
    return params


def _poison(params: list[Tensor], bad: Tensor) -> None:
    """Puts NaN into one gradient entry where ``bad`` (a 0-dim bool tensor), without a host sync."""
    grad = next((p.grad for p in params if p.grad is not None and p.grad.numel() > 0), None)
    if grad is None:
        return
    with torch.no_grad():
        entry = grad[(0,) * grad.dim()]
        entry.copy_(torch.where(bad.to(grad.device), torch.full_like(entry, math.nan), entry))
