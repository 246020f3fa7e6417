"""SAMMixin with ``Trainer(accumulate_grad_batches=K)``: SAM on the whole window, against SAM written out by hand
on the window's concatenated micro-batches (float64 reference, float32 training: 1e-6 after a few steps)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _lightning import DigitsModule
from test_sam import LR, RHO, RecordingLogger, SAMDigits, fit, loss_of, max_diff, train_batches
from test_sam_variants import looksam_component, looksam_update
from torch import nn

from lightning_landscape.sam import SAMMixin


def window_grad(model: nn.Module, window: list, k: int) -> list[torch.Tensor]:
    """Σ_i ∇(L_i / k) over the window's micro-batches, as Lightning accumulates it."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for batch in window:
        for t, g in zip(total, torch.autograd.grad(loss_of(model, batch) / k, params), strict=True):
            t.add_(g)
    return total


def window_reference(model, windows, k, lr=LR, rho=RHO, adaptive=False, eta=0.01, optimizer="sgd"):
    """SAM steps over accumulation windows, as accumulation defines them: g = Σ_i ∇L_i(w)/k over the window's
    micro-batches, one ε from g, g_sam = Σ_i ∇L_i(w + ε)/k, then the optimizer (SGD or Adam) with g_sam."""
    model = copy.deepcopy(model).double()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)

    for window in windows:
        g = window_grad(model, window, k)
        with torch.no_grad():
            t = [p.abs() + eta if adaptive else torch.ones_like(p) for p in params]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
            w = [p.clone() for p in params]
            for p, ti, gi in zip(params, t, g, strict=True):
                p.add_(rho * ti * ti * gi / norm)
        g_sam = window_grad(model, window, k)
        with torch.no_grad():
            for p, wi, gi in zip(params, w, g_sam, strict=True):
                p.copy_(wi)
                p.grad = gi
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize(("k", "adaptive", "optimizer"), [(2, False, "sgd"), (2, True, "adam"), (4, False, "sgd")])
def test_accumulation_is_sam_on_the_whole_window(tmp_path, k, adaptive, optimizer):
    steps = 2
    rho, lr = (0.5, 0.01) if adaptive else (RHO, LR)
    module = SAMDigits(lr=lr, sam=True, sam_rho=rho, sam_adaptive=adaptive, optimizer=optimizer)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=steps, accumulate_grad_batches=k)
    batches = train_batches(4)  # unshuffled, 4 per epoch: the windows go round the epoch
    windows = [[batches[(i * k + j) % 4] for j in range(k)] for i in range(steps)]
    expected = window_reference(start, windows, k, lr=lr, rho=rho, adaptive=adaptive, optimizer=optimizer)
    assert max_diff(module.net.parameters(), expected) < 1e-6  # float32 training vs float64 reference
    assert module.calls == 2 * steps * k  # every micro-batch twice: at w and at w + ε


def test_same_as_one_batch_k_times_larger(tmp_path):
    """Accumulating 2 micro-batches of 32 is the SAM step on batches of 64 (the promise accumulation makes)."""
    big = SAMDigits(lr=LR, sam=True)
    small = SAMDigits(lr=LR, sam=True, model=copy.deepcopy(big.net))
    fit(big, tmp_path, steps=2)
    from _lightning import loaders, trainer

    t = trainer(tmp_path, [], max_steps=2, max_epochs=-1, logger=False, accumulate_grad_batches=2)
    train, _ = loaders(batch_size=32, shuffle=False)
    t.fit(small, train)
    assert max_diff(small.net.parameters(), big.net.parameters()) < 1e-6  # float32 summation order only


def test_fp16_mixed_with_accumulation_matches_the_larger_batch(tmp_path):
    """16-mixed (GradScaler): the accumulated, scaled first gradient is unscaled before ε as without accumulation."""
    from _lightning import loaders, trainer
    from test_sam import fp16_plugin

    big = SAMDigits(lr=LR, sam=True)
    small = SAMDigits(lr=LR, sam=True, model=copy.deepcopy(big.net))
    fit(big, tmp_path, steps=2, plugins=[fp16_plugin(2.0**10)])
    plugin = fp16_plugin(2.0**10)
    t = trainer(tmp_path, [], max_steps=2, max_epochs=-1, logger=False, accumulate_grad_batches=2, plugins=[plugin])
    train, _ = loaders(batch_size=32, shuffle=False)
    t.fit(small, train)
    assert plugin.scaler.get_scale() == 2.0**10  # no step skipped
    # float16 forward passes over 32 vs 64 samples round differently (measured ~1e-7); a wrong scale would be ~1e-3
    assert max_diff(small.net.parameters(), big.net.parameters()) < 1e-5


def test_partial_window_at_the_end_of_an_epoch(tmp_path):
    """4 batches per epoch, K = 3: windows [0, 1, 2] and [3]; Lightning divides every micro-batch's loss by K,
    the last window's too, and so does the second pass."""
    module = SAMDigits(lr=LR, sam=True)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=2, accumulate_grad_batches=3)
    b = train_batches(4)
    expected = window_reference(start, [b[:3], b[3:]], 3)
    assert max_diff(module.net.parameters(), expected) < 1e-6
    assert module.calls == 8


def test_sam_off_with_accumulation_is_plain_training(tmp_path):
    plain = DigitsModule(lr=LR)
    off = SAMDigits(lr=LR, sam=False, model=copy.deepcopy(plain.net))
    fit(plain, tmp_path, steps=2, accumulate_grad_batches=2)
    fit(off, tmp_path, steps=2, accumulate_grad_batches=2)
    assert all(torch.equal(a, b) for a, b in zip(plain.net.parameters(), off.net.parameters(), strict=True))


def test_every_n_steps_and_reuse_with_accumulation(tmp_path):
    """SAM on every 2nd window, LookSAM's reuse between: the plain window steps with g + α‖g‖/‖g_v‖·g_v."""
    k, alpha = 2, 0.7
    module = SAMDigits(lr=LR, sam=True, sam_every_n_steps=2, sam_reuse=True, sam_reuse_alpha=alpha)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=3, accumulate_grad_batches=k)
    b = train_batches(4)  # unshuffled, 4 per epoch
    windows = [b[0:2], b[2:4], b[0:2]]
    net = copy.deepcopy(start).double()
    params = list(net.parameters())
    g_v = None
    for step, window in enumerate(windows):
        g = window_grad(net, window, k)
        if step % 2 == 1:  # global_step 1: the 2nd step is a SAM step
            with torch.no_grad():
                norm = torch.sqrt(sum((gi**2).sum() for gi in g))
                w = [p.clone() for p in params]
                for p, gi in zip(params, g, strict=True):
                    p.add_(RHO * gi / norm)
            update = window_grad(net, window, k)
            with torch.no_grad():
                for p, wi in zip(params, w, strict=True):
                    p.copy_(wi)
                g_v = looksam_component(g, update)
        elif g_v is not None:
            with torch.no_grad():
                update = looksam_update(g, g_v, alpha)
        else:
            update = g
        with torch.no_grad():
            for p, u in zip(params, update, strict=True):
                p.sub_(LR * u)
    assert max_diff(module.net.parameters(), params) < 1e-6


def test_sam_log_sharpness_is_in_loss_units_under_accumulation(tmp_path):
    """``sam/sharpness`` is the last micro-batch's L(w + ε) − L(w), not divided by K."""
    k = 2
    module = SAMDigits(lr=LR, sam=True, sam_log=True)
    start = copy.deepcopy(module.net).double()
    logger = RecordingLogger()
    fit(module, tmp_path, steps=1, accumulate_grad_batches=k, logger=logger, log_every_n_steps=1)
    logged = logger.values("sam/sharpness")
    assert len(logged) == 1
    b = train_batches(2)
    params = list(start.parameters())
    g = window_grad(start, b, k)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    before = loss_of(start, b[-1]).item()
    with torch.no_grad():
        for p, gi in zip(params, g, strict=True):
            p.add_(RHO * gi / norm)
    after = loss_of(start, b[-1]).item()
    assert logged[0] == pytest.approx(after - before, rel=1e-4, abs=1e-6)  # float32 loss difference
    assert logger.values("sam/grad_norm")[0] == pytest.approx(norm.item(), rel=1e-5)


class Forgetful(SAMDigits):
    def on_train_batch_start(self, batch, batch_idx):  # no super(): SAM cannot see the window
        return None


def test_override_without_super_is_an_error_not_a_silent_plain_step(tmp_path):
    module = Forgetful(lr=LR, sam=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"must call `super\(\).on_train_batch_start"):
            fit(module, tmp_path, steps=1, accumulate_grad_batches=2)
    assert any("on_train_batch_start" in str(w.message) for w in caught)  # warned at setup already


def test_accumulation_is_refused_under_fsdp2_only():
    import types

    from pytorch_lightning.strategies import ModelParallelStrategy, SingleDeviceStrategy

    module = SAMDigits(lr=LR, sam=True)
    fake = types.SimpleNamespace(strategy=ModelParallelStrategy(), accumulate_grad_batches=2, optimizers=[])
    with pytest.raises(ValueError, match=r"accumulate_grad_batches > 1.*ModelParallelStrategy"):
        module._sam_check(fake)
    fine = types.SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), accumulate_grad_batches=2, optimizers=[])
    module._sam_check(fine)


def test_micro_batches_are_let_go_after_the_step(tmp_path):
    module = SAMDigits(lr=LR, sam=True)
    fit(module, tmp_path, steps=1, accumulate_grad_batches=2)
    assert module._sam_window is None
    assert isinstance(module, SAMMixin) and isinstance(module.net, nn.Module)
