"""SAMMixin's variants (every-k, ``sam_params="norm"``, LookSAM, ``sam_log``) under what Lightning does around the
step: gradient clipping by norm and by value, ``bf16-mixed`` / ``16-mixed`` precision on the CPU, and fp16 with a
``GradScaler``. Each through a real Trainer, against the same steps written out in plain torch with the same
autocast dtype, the same loss scale and the same clipping as Lightning applies them.

What Lightning does on the CPU (pytorch_lightning 2.6): ``Trainer(precision="16-mixed")`` warns and runs
``bf16-mixed`` (no ``GradScaler``); fp16 autocast with a scaler runs when the ``MixedPrecision`` plugin is built
by hand (``plugins=[MixedPrecision("16-mixed", "cpu", scaler=...)]``). Both are tested. Autocast covers
``training_step`` only (backward follows the recorded dtypes); clipping runs after the scaler's ``unscale_`` and
after ``on_before_optimizer_step``, on the gradient the optimizer is about to use (for SAM steps ``g_sam``, for
LookSAM's plain steps ``g`` plus the reused component).

Already covered elsewhere (``tests/test_sam.py``, ``tests/test_sam_variants.py``): every variant with SGD and Adam
in float32, BatchNorm with ``"norm"``; plain SAM with norm clipping, bf16-mixed and the fp16 scaler.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_sam import LR, RHO, RecordingLogger, SAMDigits, fit, fp16_plugin, loss_of, max_diff, train_batches
from test_sam_variants import LoggedDigits, bn_net, looksam_component, looksam_update
from test_sam_variants import reference as float64_reference
from torch import nn

ALPHA = 0.7
SCALE = 2.0**14  # a power of two: scaling and unscaling a gradient are exact, only fp16's own rounding differs


def reference(
    net: nn.Module,
    batches: list,
    *,
    optimizer: str = "sgd",
    lr: float = LR,
    momentum: float = 0.9,
    rho: float = RHO,
    every: int = 1,
    perturb: set[str] | None = None,
    alpha: float | None = None,
    clip: float | None = None,
    clip_algorithm: str = "norm",
    autocast: torch.dtype | None = None,
    scale: float = 1.0,
) -> tuple[list[torch.Tensor], dict[int, dict[str, float]]]:
    """The variants written out, with Lightning's surroundings: on the k-th, 2k-th, … step SAM with ε over the
    parameters named in ``perturb`` (all if ``None``); between them plain steps, plus LookSAM's
    ``α·‖g‖/‖g_v‖·g_v`` when ``alpha`` is given; then clipping of the final gradient as ``clip_grad_norm_`` /
    ``clip_grad_value_``, then the optimizer.

    float64 unless ``autocast`` (a dtype) is given: then float32 weights and the forward under CPU autocast as
    Lightning's ``MixedPrecision`` runs it, and gradients of ``loss * scale`` multiplied by ``1/scale`` (the
    GradScaler's unscaling). Returns the final weights and, per SAM step, what ``sam_log`` should report there.
    """
    model = copy.deepcopy(net)
    if autocast is None:
        model = model.double()
    named = list(model.named_parameters())
    params = [p for _, p in named]
    sel = [i for i, (n, _) in enumerate(named) if perturb is None or n in perturb]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr, momentum=momentum)

    def loss_and_grad(batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if autocast is None:
            loss = loss_of(model, batch)
        else:
            with torch.autocast("cpu", dtype=autocast, cache_enabled=False):
                loss = loss_of(model, batch)
        grads = torch.autograd.grad(loss * scale, params)
        return loss.detach(), [g * (1.0 / scale) for g in grads]

    logs: dict[int, dict[str, float]] = {}
    g_v = None
    for step, batch in enumerate(batches):
        loss, g = loss_and_grad(batch)
        if (step + 1) % every == 0:
            with torch.no_grad():
                norm = torch.sqrt(sum((g[i] ** 2).sum() for i in sel))
                w = [p.clone() for p in params]
                for i in sel:
                    params[i].add_(rho * g[i] / norm)
            perturbed, update = loss_and_grad(batch)
            with torch.no_grad():
                for p, wi in zip(params, w, strict=True):
                    p.copy_(wi)
                g_v = looksam_component(g, update)
            logs[step] = {"sharpness": (perturbed - loss).item(), "grad_norm": norm.item(), "rho": rho}
        elif alpha is not None and g_v is not None:
            with torch.no_grad():
                update = looksam_update(g, g_v, alpha)
        else:
            update = g
        for p, u in zip(params, update, strict=True):
            p.grad = u.detach().clone()
        if clip is not None and clip_algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, clip)
        elif clip is not None:
            torch.nn.utils.clip_grad_value_(params, clip)
        opt.step()
    return [p.detach() for p in params], logs


# name -> (SAMMixin settings, steps, model factory, reference settings); the steps put a LookSAM plain step and an
# every-k plain step after a SAM step, so the reused component and the plain gradient are both exercised
VARIANTS = {
    "every_k": (dict(sam_every_n_steps=3), 7, None, dict(every=3)),
    "norm": (dict(sam_params="norm"), 4, bn_net, dict(perturb={"1.weight", "1.bias"})),
    "looksam": (dict(sam_every_n_steps=3, sam_reuse=True, sam_reuse_alpha=ALPHA), 8, None, dict(every=3, alpha=ALPHA)),
    "log": (dict(sam_every_n_steps=2, sam_log=True), 4, None, dict(every=2)),
}

# setting -> (Trainer keywords, reference keywords, tolerance on the weights), errors measured on this CPU:
# - clipping: float32 weights against the float64 reference, float32 rounding over a few steps (≤ 2e-7);
# - bf16-mixed: the reference runs the same autocast ops on the same float32 weights: bitwise equal (0.0) except
#   LookSAM (3e-7), whose ‖g‖, ‖g_v‖ and g·g_s are summed in another order than the reference sums them;
# - fp16 with a loss scale: bitwise equal (0.0) except LookSAM (1.2e-5). The same 1e-7 summation difference moves
#   a weight across an fp16 rounding boundary of the next forward (fp16 keeps 11 bits: a flipped rounding changes
#   a gradient entry by ~5e-4 of itself, ~1e-4 of the 0.1 learning rate's step here). 5e-5 allows that, and is
#   still 800x under the 4e-2 by which LookSAM's reuse moves the weights (so a wrong g_v is caught).
SETTINGS = {
    "clip_norm": (dict(gradient_clip_val=0.05, gradient_clip_algorithm="norm"), dict(clip=0.05), 1e-6),
    "clip_value": (
        dict(gradient_clip_val=2e-3, gradient_clip_algorithm="value"),
        dict(clip=2e-3, clip_algorithm="value"),
        1e-6,
    ),
    "bf16_mixed": (dict(precision="bf16-mixed"), dict(autocast=torch.bfloat16), 1e-6),
    "fp16_scaled": (dict(plugins="fp16"), dict(autocast=torch.float16, scale=SCALE), 5e-5),
}


def _trainer_kwargs(setting: str) -> dict:
    kwargs = dict(SETTINGS[setting][0])
    if kwargs.get("plugins") == "fp16":
        kwargs["plugins"] = [fp16_plugin(SCALE)]
    return kwargs


def _module(variant: str, **extra):
    sam_kwargs, _, factory, _ = VARIANTS[variant]
    model = factory() if factory is not None else None
    cls = LoggedDigits if sam_kwargs.get("sam_log") else SAMDigits
    return cls(lr=LR, momentum=0.9, sam=True, sam_rho=RHO, model=model, **sam_kwargs, **extra)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_under_clipping_and_precision_matches_reference(tmp_path, variant, setting):
    _, steps, _, ref_kwargs = VARIANTS[variant]
    _, setting_ref, tol = SETTINGS[setting]
    logger = RecordingLogger()
    module = _module(variant)
    start = copy.deepcopy(module.net)
    kwargs = _trainer_kwargs(setting)
    t = fit(module, tmp_path, steps=steps, logger=logger, log_every_n_steps=1, **kwargs)
    assert t.global_step == steps
    if setting == "fp16_scaled":
        assert t.precision_plugin.scaler.get_scale() == SCALE  # no step skipped, no scale change: comparable
    assert all(p.dtype == torch.float32 for p in module.parameters())
    batches = (train_batches(4) * 2)[:steps]
    expected, logs = reference(start, batches, **ref_kwargs, **setting_ref)
    assert max_diff(module.net.parameters(), expected) < tol
    if setting != "fp16_scaled":  # the setting matters: the float64 reference of the variant alone is elsewhere
        without, _ = reference(start, batches, **ref_kwargs)  # (fp16 with its scale is meant to land near it)
        assert max_diff(without, expected) > 20 * tol
    # and the variant matters: plain SAM on every step under the same setting is elsewhere too
    sam, _ = reference(start, batches, **setting_ref)
    assert max_diff(sam, expected) > 20 * tol
    if variant == "log":  # sam/ values on SAM steps only, as the reference computes them under the same setting
        logged = {step: m for step, m in logger.metrics if "train_loss" in m}
        assert sorted(s for s, m in logged.items() if "sam/sharpness" in m) == sorted(logs)
        for step, want in logs.items():
            # losses: the same forward ops as the reference (float32 vs float64 without autocast): 1e-6 absolute;
            # the norm: a sum of squares in another order, and unscaled (fp16: a missing unscale is 16384x off)
            assert logged[step]["sam/sharpness"] == pytest.approx(want["sharpness"], abs=1e-6)
            assert logged[step]["sam/grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
            assert logged[step]["sam/rho"] == pytest.approx(RHO, rel=1e-7)
            assert want["sharpness"] > 0


def test_references_agree_in_float64():
    """This file's reference, with no setting, is the variants file's reference (independently written)."""
    batches = (train_batches(4) * 2)[:8]
    for _, (_, steps, factory, ref_kwargs) in VARIANTS.items():
        net = factory() if factory is not None else SAMDigits().net
        ours, _ = reference(net, batches[:steps], **ref_kwargs)
        theirs = float64_reference(net, batches[:steps], momentum=0.9, **ref_kwargs)
        assert max_diff(ours, theirs) < 1e-12  # same float64 operations up to summation order


@pytest.mark.parametrize("variant", ["every_k", "looksam"])
def test_adam_with_clipping_matches_reference(tmp_path, variant):
    """Adam normalizes each coordinate, so a wrongly clipped or wrongly scaled update would still move every
    weight by about lr: the comparison is on the weights after Adam's steps."""
    _, steps, _, ref_kwargs = VARIANTS[variant]
    module = _module(variant, optimizer="adam")
    module.lr = 1e-3
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=steps, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
    batches = (train_batches(4) * 2)[:steps]
    expected, _ = reference(start, batches, optimizer="adam", lr=1e-3, clip=0.05, **ref_kwargs)
    assert max_diff(module.net.parameters(), expected) < 1e-6  # float32 vs float64 (measured < 1e-7)
    unclipped, _ = reference(start, batches, optimizer="adam", lr=1e-3, **ref_kwargs)
    assert max_diff(unclipped, expected) > 1e-5


def test_16_mixed_on_cpu_is_bf16_mixed(tmp_path):
    """``precision="16-mixed"`` on the CPU is Lightning's bf16-mixed (a warning says so): every variant at once
    (SAM-ON on a BatchNorm net, every 3rd step, LookSAM, logging) steps bitwise the same under both flags."""
    runs = []
    for precision in ("16-mixed", "bf16-mixed"):
        module = LoggedDigits(lr=LR, momentum=0.9, sam=True, model=bn_net(), sam_params="norm", sam_every_n_steps=3,
                              sam_reuse=True, sam_log=True)  # fmt: skip
        if precision == "16-mixed":
            with pytest.warns(UserWarning, match="fp16 is not supported on CPU. Using `precision='bf16-mixed'`"):
                t = fit(module, tmp_path, steps=7, precision=precision)
        else:
            t = fit(module, tmp_path, steps=7, precision=precision)
        assert t.precision_plugin.precision == "bf16-mixed" and getattr(t.precision_plugin, "scaler", None) is None
        runs.append([p.detach().clone() for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
