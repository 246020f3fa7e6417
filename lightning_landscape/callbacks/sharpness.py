"""``SharpnessCallback``: sharpness of the training loss beside the generalization gap it is meant to explain."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lightning_landscape._lightning import LightningModule, Trainer
from lightning_landscape.callbacks._base import LossFn, MeasurementCallback, check_bool
from lightning_landscape.callbacks._blocks import BlocksArg, check_blocks, resolve_blocks
from lightning_landscape.functional._sharded import is_sharded
from lightning_landscape.functional.hvp import LossOperator
from lightning_landscape.functional.sharpness import KINDS, NORMS, check_sharpness_args, sharpness_estimate

if TYPE_CHECKING:
    from matplotlib.figure import Figure


__all__ = ["DEFAULT_KINDS", "SharpnessCallback", "parse_sharpness_spec"]

#: What :class:`SharpnessCallback` measures by default: worst- and average-case ℓ2, plain and adaptive.
DEFAULT_KINDS = ("worst_case_l2", "worst_case_l2_adaptive", "average_case_l2", "average_case_l2_adaptive")

SharpnessSpec = str | tuple[str, str] | tuple[str, str, bool]

_GENERALIZATION = "generalization"


def parse_sharpness_spec(spec: SharpnessSpec) -> tuple[str, str, bool]:
    """``(kind, norm, adaptive)`` from a spec: a string ``"<kind>_<norm>[_adaptive]"`` (``"keskar"``
    alone means ``"keskar_linf"``) or a tuple ``(kind, norm)`` / ``(kind, norm, adaptive)``.

    Raises:
        ValueError: naming ``kinds`` and the accepted forms.

    Example:
        >>> parse_sharpness_spec("average_case_linf_adaptive")
        ('average_case', 'linf', True)
        >>> parse_sharpness_spec(("worst_case", "l2"))
        ('worst_case', 'l2', False)
        >>> parse_sharpness_spec("keskar")
        ('keskar', 'linf', False)
    """
    accepted = (
        f"`kinds` entries must be strings '<kind>_<norm>[_adaptive]' with kind in {KINDS} and norm in {NORMS} "
        "(e.g. 'worst_case_l2', 'average_case_l2_adaptive', 'keskar_linf'), or tuples (kind, norm[, adaptive])"
    )
    if isinstance(spec, str):
        text = spec
        adaptive = text.endswith("_adaptive")
        if adaptive:
            text = text[: -len("_adaptive")]
        if text == "keskar":
            kind, norm = "keskar", "linf"
        else:
            kind, _, norm = text.rpartition("_")
    elif isinstance(spec, tuple) and len(spec) in (2, 3):
        kind, norm = spec[0], spec[1]
        adaptive = spec[2] if len(spec) == 3 else False
    else:
        raise ValueError(f"{accepted}; got {spec!r}.")
    if kind not in KINDS or norm not in NORMS or not isinstance(adaptive, bool):
        raise ValueError(f"{accepted}; got {spec!r}.")
    try:
        check_sharpness_args(1.0, kind, norm, adaptive, 0.0, 1, 1)
    except ValueError as err:
        raise ValueError(f"`kinds`: {spec!r} is not a valid measure: {err}") from None
    return kind, norm, adaptive


class SharpnessCallback(MeasurementCallback):
    """Logs the sharpness of the training loss at the current weights, and the generalization gap.

    Each measurement runs, on a fixed probe set of the train loader (``num_samples`` or ``num_batches``), every
    sharpness measure in ``kinds`` (see :func:`~lightning_landscape.functional.sharpness.sharpness` for the exact
    definitions: worst case by projected gradient ascent, average case by Monte Carlo, Keskar's
    ε-sharpness), on the module's device, in eval mode, without touching weights, gradients, buffers,
    modes or the global RNG (random draws come from the callback's own generator). When the trainer has
    a validation loader, it also evaluates the loss on a validation probe of the same size at the
    same weights. Under DDP every loss and gradient is the sample-weighted mean over all ranks' probe
    data (reduced by the loss operator through ``trainer.strategy``), so all ranks get the same values
    and rank zero logs them.

    Logged: ``sharpness/<kind>_<norm>[_adaptive]`` for each entry of ``kinds``; ``sharpness/weight_norm``
    (ℓ2 norm of the measured parameters: plain sharpness changes under reparametrization, so its scale
    belongs beside it); ``sharpness/seconds``; and with a validation loader ``generalization/train_loss``,
    ``generalization/val_loss`` and ``generalization/gap = val_loss − train_loss``.

    Cost per measurement: ``steps`` gradients and one forward pass over the probe set per worst-case or
    keskar entry, ``2·samples + 1`` forward passes per average-case entry, and one forward pass each for
    the train and validation losses.

    Args:
        every_n_train_steps: measure every ``n`` optimizer steps (or give ``every_n_epochs``, or neither:
            see ``max_overhead``).
        every_n_epochs: measure at the end of every ``n``-th epoch.
        rho: radius of the perturbation (for ``keskar``, its ε); one number for every measure, or a mapping
            from each tag in ``kinds`` to its own radius (e.g. ``{"worst_case_l2": 0.05, "keskar_linf": 1e-3}``).
        kinds: the measures, as strings ``"<kind>_<norm>[_adaptive]"`` (kind ``worst_case``,
            ``average_case`` or ``keskar``; norm ``l2`` or ``linf``; ``"keskar"`` alone is ``"keskar_linf"``)
            or tuples ``(kind, norm[, adaptive])``. Default :data:`DEFAULT_KINDS`.
        num_batches: probe batches (train, and validation for the gap) (or give ``num_samples``).
        num_samples: probe size in samples instead (default: one batch).
        loss_fn: ``loss_fn(module, batch) -> scalar``; default the module's ``training_step``.
        steps: gradient evaluations of each worst-case ascent.
        samples: draws of each average-case estimate (each evaluated at ``±z``).
        eta: ``η`` of the adaptive scale ``|w| + η``.
        generalization: log the ``generalization/`` tags when a validation loader exists.
        eval_mode: measure in eval mode.
        seed: seed of the callback's generator and of the probe draw.
        strict: raise instead of warning when a measurement fails.
        max_overhead: with neither schedule (the default), the share of the fit's wall time this callback
            may take; ``None`` shares 5% among the trainer's callbacks that use the default.
        blocks: also measure each block of parameters alone (the others held fixed): ``"module"`` (the
            network's top-level modules), ``"layer"`` (every module that owns parameters), ``"parameter"``, or a
            mapping ``{block name: names / glob patterns / predicate}`` (see
            :mod:`lightning_landscape.callbacks._blocks` for how the network is found inside the module). Logged as
            ``sharpness/<block>/<kind>_<norm>[_adaptive]``; the radius is the same ``rho`` (for adaptive kinds it
            scales with the block's own weights). Each block costs what the whole-model measures cost again; at
            most 32 blocks.

    Example:
        >>> cb = SharpnessCallback(every_n_epochs=1, rho=0.1, kinds=["worst_case_l2", ("keskar", "linf")])
        >>> cb.tags
        ['worst_case_l2', 'keskar_linf']
    """

    state_key_fields = (*MeasurementCallback.state_key_fields, "rho", "_tags")
    prefix = "sharpness"

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        rho: float | Mapping[str, float] = 0.05,
        kinds: Sequence[SharpnessSpec] = DEFAULT_KINDS,
        num_batches: int | None = None,
        num_samples: int | None = None,
        loss_fn: LossFn | None = None,
        steps: int = 20,
        samples: int = 20,
        eta: float = 0.01,
        generalization: bool = True,
        eval_mode: bool = True,
        seed: int = 0,
        strict: bool = False,
        max_overhead: float | None = None,
        blocks: BlocksArg = None,
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
        plain_rho = 1.0 if isinstance(rho, Mapping) else rho  # a mapping's radii are checked per measure below
        check_sharpness_args(plain_rho, "worst_case", "l2", False, eta, steps, samples)  # rho, eta, steps, samples
        if isinstance(kinds, str) or _is_one_spec(kinds):
            kinds = [kinds]  # one spec given bare: "worst_case_l2" or ("worst_case", "l2"[, adaptive])
        if not isinstance(kinds, Sequence):
            raise ValueError(f"`kinds` must be a list of measure specs, got {kinds!r}.")
        specs = [parse_sharpness_spec(k) for k in kinds]
        tags = [_tag(*s) for s in specs]
        radii = _radii(rho, tags)
        for (kind, norm, adaptive), tag in zip(specs, tags, strict=True):
            check_sharpness_args(radii[tag], kind, norm, adaptive, eta, steps, samples)
        duplicates = sorted({t for t in tags if tags.count(t) > 1})
        if duplicates:
            raise ValueError(f"`kinds` lists {', '.join(duplicates)} more than once.")
        if not isinstance(generalization, bool):
            raise ValueError(f"`generalization` must be True or False, got {generalization!r}.")
        if not specs and not generalization:
            raise ValueError("`kinds` is empty and `generalization=False`: there is nothing to measure.")
        self.rho = dict(rho) if isinstance(rho, Mapping) else float(rho)
        self.radii = radii
        self.specs = specs
        self._tags = tuple(tags)
        self.steps = steps
        self.samples = samples
        self.eta = float(eta)
        check_bool("generalization", generalization)
        self.generalization = generalization
        self.blocks = check_blocks(blocks)
        self._block_params: dict[str, list[str]] | None = None

    def check_model(self, pl_module: LightningModule) -> None:
        super().check_model(pl_module)
        if self.blocks is not None:
            if is_sharded(pl_module):
                raise ValueError("SharpnessCallback: `blocks` is not supported for a sharded (FSDP2) module.")
            self._block_params = resolve_blocks(pl_module, self.blocks, type(self).__name__)

    @property
    def needs_val_probe(self) -> bool:
        return self.generalization

    def work_in_gradients(self) -> float:
        work = 2.0 if self.generalization else 0.0  # train and validation losses
        per_run = sum(2 * self.samples / 3.0 if kind == "average_case" else self.steps + 1 for kind, _, _ in self.specs)
        blocks = len(self._block_params or {}) if self.blocks is not None else 0
        return work + per_run * (1 + blocks)

    @property
    def tags(self) -> list[str]:
        """The scalar names of the sharpness measures, ``<kind>_<norm>[_adaptive]``, in order."""
        return list(self._tags)

    def _estimates(self, op: LossOperator, prefix: str = "") -> dict[str, float]:
        scalars = {}
        for (kind, norm, adaptive), tag in zip(self.specs, self._tags, strict=True):
            result = sharpness_estimate(
                op,
                self.radii[tag],
                kind=kind,
                norm=norm,
                adaptive=adaptive,
                eta=self.eta,
                steps=self.steps,
                samples=self.samples,
                generator=self.generator,
            )
            scalars[prefix + result.tag] = result.value
        return scalars

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, float], dict[str, Figure]]:
        with self.operator(trainer, pl_module, self._probe) as op:
            scalars = self._estimates(op)
            weight_norm = float(op.space.norm(op.parameter_vector().double()))
            train_loss = op.loss() if self.generalization else None
        scalars["weight_norm"] = weight_norm
        for block, names in self._blocks_of(pl_module).items():
            with self.operator(trainer, pl_module, self._probe, params=names) as op:
                scalars.update(self._estimates(op, prefix=f"{self.prefix}/{block}/"))
        if self.generalization:
            val_batches = self.val_probe(trainer)
            if val_batches:
                with self.operator(trainer, pl_module, val_batches) as val_op:
                    val_loss = val_op.loss()
                train, val = float(train_loss), float(val_loss)
                scalars[f"{_GENERALIZATION}/train_loss"] = train
                scalars[f"{_GENERALIZATION}/val_loss"] = val
                scalars[f"{_GENERALIZATION}/gap"] = val - train
        return scalars, {}


def _radii(rho: float | Mapping[str, float], tags: list[str]) -> dict[str, float]:
    """The radius of each measure: ``rho`` for all, or ``rho[tag]`` (which must name every tag, and only those)."""
    if not isinstance(rho, Mapping):
        return dict.fromkeys(tags, rho)
    unknown, missing = sorted(set(rho) - set(tags)), [t for t in tags if t not in rho]
    if unknown or missing:
        raise ValueError(
            f"`rho` as a mapping needs one radius for each measure in `kinds` {tags}"
            + (f"; not in `kinds`: {unknown}" if unknown else "")
            + (f"; missing: {missing}" if missing else "")
            + "."
        )
    return {tag: rho[tag] for tag in tags}


def _is_one_spec(kinds: object) -> bool:
    """Whether ``kinds`` is a single tuple spec ``(kind, norm[, adaptive])`` rather than a sequence of specs."""
    return (
        isinstance(kinds, tuple)
        and len(kinds) in (2, 3)
        and kinds[0] in KINDS
        and kinds[1] in NORMS
        and (len(kinds) == 2 or isinstance(kinds[2], bool))
    )


def _tag(kind: str, norm: str, adaptive: bool) -> str:
    return f"{kind}_{norm}" + ("_adaptive" if adaptive else "")
