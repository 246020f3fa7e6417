"""``SAMMixin``: sharpness-aware minimization (SAM, Foret et al. 2021; ASAM, Kwon et al. 2021) by one flag.

Each optimizer step of a module that mixes this in, with ``sam`` on:

1. Lightning's own closure runs ``training_step`` and ``backward`` at the weights ``w``: ``g = ∇L_B(w)``
   (``self.log`` calls count here, BatchNorm statistics move here; under DDP without the all-reduce);
2. ``ε = ρ·g/‖g‖₂`` (SAM) or ``ε = ρ·T²g/‖Tg‖₂`` with ``T = |w| + η`` (ASAM), the norm over every
   parameter the optimizer holds that has a gradient (:func:`~lightning_landscape.functional._perturbation.ascent_step`,
   the same step worst-case sharpness starts with);
3. the closure runs again at ``w + ε`` with ``self.log`` silenced and module buffers, plain attributes and torchmetrics
   states left as the first pass made them: ``g_sam = ∇L_B(w + ε)`` (under DDP all-reduced);
4. ``w`` is restored exactly (a copy, not ``w + ε - ε``) and Lightning carries on as always: precision
   plugin (unscaling, skipping non-finite steps), ``on_before_optimizer_step``, gradient clipping, then the
   user's optimizer steps with ``g_sam``; LR schedulers, ``global_step`` and checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_landscape._lightning import Trainer
from lightning_landscape._user_state import invisible_user_code
from lightning_landscape.functional._perturbation import ascent_step

__all__ = ["SAMMixin"]

_UNSUPPORTED_STRATEGIES = (
    "FSDPStrategy",
    "DeepSpeedStrategy",
    "ModelParallelStrategy",
    "XLAStrategy",
    "SingleDeviceXLAStrategy",
)


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

    Unsupported, with an error at ``setup``: manual optimization, ``accumulate_grad_batches > 1`` (the
    micro-batches before the last are gone when ``ε`` is known), FSDP, DeepSpeed, model-parallel and XLA
    strategies. A class that overrides ``optimizer_step`` must call ``super().optimizer_step(...)``.

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
        ValueError: `sam_rho` must be a finite number > 0, got -1.0.
    """

    # class-level defaults, so the properties work even before ``__init__`` has run
    _sam: bool = False
    _sam_rho: float = 0.05
    _sam_adaptive: bool = False
    _sam_eta: float = 0.01
    _sam_sync_first: bool = False
    _sam_perturbed: bool = False
    _sam_originals: dict[int, Tensor] | None = None  # during the second pass: id(tensor) -> its value at w

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
        sam_rho: float = 0.05,
        sam_adaptive: bool = False,
        sam_eta: float = 0.01,
        sam_sync_first: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sam = sam
        self.sam_rho = sam_rho
        self.sam_adaptive = sam_adaptive
        self.sam_eta = sam_eta
        self.sam_sync_first = sam_sync_first

    # ------------------------------------------------------------------------------------------ settings
    @property
    def sam(self) -> bool:
        """Whether optimizer steps are SAM steps."""
        return self._sam

    @sam.setter
    def sam(self, value: bool) -> None:
        self._sam = _check_bool("sam", value)

    @property
    def sam_rho(self) -> float:
        """The radius ``ρ``."""
        return self._sam_rho

    @sam_rho.setter
    def sam_rho(self, value: float) -> None:
        self._sam_rho = _check_number("sam_rho", value, positive=True)

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
    def sam_perturbed(self) -> bool:
        """``True`` while the second forward-backward runs at ``w + ε`` (for hooks that must tell)."""
        return self._sam_perturbed

    # ------------------------------------------------------------------------------------------- checks
    def setup(self, stage: str) -> None:
        """Checks the Trainer's configuration when ``sam`` is on (then calls ``super().setup``)."""
        if stage == "fit" and self.sam:
            self._sam_check(self.trainer)
            plugin = self.trainer.precision_plugin
            stepping = type(plugin).optimizer_step.__qualname__
            if stepping not in ("Precision.optimizer_step", "MixedPrecision.optimizer_step"):
                rank_zero_warn(f"SAMMixin is untested with the precision plugin {type(plugin).__name__}.")
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
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "SAMMixin does not support `Trainer(accumulate_grad_batches > 1)` (got "
                f"{trainer.accumulate_grad_batches}): the perturbation needs every micro-batch again at w + ε. "
                "Use a larger batch, or DDP, instead."
            )
        strategy = trainer.strategy
        names = {cls.__name__ for cls in type(strategy).__mro__}
        if names & set(_UNSUPPORTED_STRATEGIES) or not names & {"SingleDeviceStrategy", "DDPStrategy"}:
            raise ValueError(
                f"SAMMixin supports single-device and DDP strategies, got {type(strategy).__name__}; "
                f"unsupported: {', '.join(_UNSUPPORTED_STRATEGIES)}."
            )
        if len(trainer.optimizers) > 1:
            raise ValueError(f"SAMMixin supports one optimizer, got {len(trainer.optimizers)}.")

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
    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Lightning's hook; with ``sam`` on, the closure the optimizer calls is the SAM double pass."""
        if self.sam and optimizer_closure is not None:
            self._sam_check(self.trainer)
            optimizer_closure = partial(self._sam_closure, optimizer, optimizer_closure)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def _sam_closure(self, optimizer: Any, closure: Callable[[], Any]) -> Any:
        trainer = self.trainer
        strategy = trainer.strategy
        per_rank = not self.sam_sync_first and trainer.world_size > 1 and _is_a(strategy, "ParallelStrategy")
        # first pass at w: Lightning's closure (training_step, zero_grad, backward, hooks, logging)
        with strategy.block_backward_sync() if per_rank else contextlib.nullcontext():
            loss = closure()
        if loss is None:  # training_step returned None: no gradient, nothing to perturb
            return loss
        params = _params_with_grad(optimizer)
        if not params:
            return loss
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        bad = None
        with torch.no_grad():
            grads = [p.grad for p in params]
            if scaler is not None:  # 16-mixed: unscale (these gradients are discarded) and note non-finite ones
                scale = getattr(scaler, "_scale", None)
                if not isinstance(scale, Tensor):
                    scale = torch.tensor(scaler.get_scale())
                torch._foreach_mul_(grads, scale.double().reciprocal().float().to(grads[0].device))
                bad = torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum().isfinite().logical_not()
                if per_rank:  # every rank must skip the step together
                    bad = strategy.reduce(bad.float(), reduce_op="sum") > 0
            weights = params if self.sam_adaptive else None
            eps = ascent_step(grads, weights, self.sam_rho, adaptive=self.sam_adaptive, eta=self.sam_eta)
            saved = _copies([p.detach() for p in params])
            torch._foreach_add_(params, eps)
            del eps, grads
        try:  # second pass at w + ε: gradient all-reduced under DDP, no logging, buffers kept
            with self._sam_second_pass({id(p): w for p, w in zip(params, saved, strict=True)}):
                if _is_a(closure, "AbstractClosure"):
                    closure.closure()  # keeps the first pass's result as the step's output
                else:
                    closure()
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        if bad is not None:  # make GradScaler see the first pass's overflow: it skips the step
            _poison(params, bad)
        return loss

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


def _is_a(obj: object, class_name: str) -> bool:
    """Whether ``obj``'s class or a base is named ``class_name`` (either Lightning package's class matches)."""
    return any(cls.__name__ == class_name for cls in type(obj).__mro__)


def _copies(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` by one fused copy (per device and dtype) rather than one clone, one kernel, each."""
    copies = [torch.empty_like(t) for t in tensors]
    if copies:
        torch._foreach_copy_(copies, tensors)
    return copies


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
