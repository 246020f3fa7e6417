"""Faults at run time: the measurement is skipped with one warning, training completes, the next one runs."""

from __future__ import annotations

import warnings

import pytest
import torch
from _lightning import DigitsModule, loaders, trainer
from _models import SoftplusAct, cross_entropy
from torch import nn

from lightning_landscape import HessianCallback, LossLandscapeCallback
from lightning_landscape.callbacks import _base as base_module

CALLBACKS = {
    "hessian": lambda **kw: HessianCallback(every_n_train_steps=2, top_k=1, max_hvps=8, **kw),
    "landscape": lambda **kw: LossLandscapeCallback(every_n_train_steps=2, steps=3, steps_1d=3, **kw),
}


class _FailOnCall:
    """A loss_fn that raises on its n-th call (counting every call the measurement makes)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, module, batch):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("injected failure")
        return cross_entropy(module, batch)


class _TanhGrad(torch.autograd.Function):
    """The backward of tanh as its own op, with no derivative (like a fused attention kernel's)."""

    @staticmethod
    def forward(ctx, grad, y):
        return grad * (1 - y * y)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("derivative for tanh_grad_fused is not implemented")


class _NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _TanhGrad.apply(grad, y)


class _Fused(nn.Module):
    def forward(self, x):
        return _NoDoubleBackward.apply(x)


def _fit(tmp_path, cb, module=None, steps=6):
    train, _ = loaders(n_train=192, batch_size=32)
    module = module or DigitsModule()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_steps=steps, logger=False).fit(module, train)
    skipped = [w for w in caught if "skipped the measurement" in str(w.message)]
    return module, skipped


def _nan_loss(module, batch):
    return cross_entropy(module, batch) * float("nan")


def _first_measurement_nan():
    state = {"calls": 0}

    def loss_fn(module, batch):
        state["calls"] += 1
        loss = cross_entropy(module, batch)
        return loss * float("nan") if module.trainer.global_step <= 2 else loss

    return loss_fn


@pytest.mark.parametrize("call", [1, 2])
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_loss_fn_raising_once(tmp_path, monkeypatch, name, call):
    """Also on its very first call (the first backward pass's checkpointing check, which once hid it by calling
    the loss again); the fit's summary line counts the skipped measurement apart."""
    said = []
    monkeypatch.setattr(base_module, "rank_zero_info", lambda message, *a, **k: said.append(message))
    cb = CALLBACKS[name](loss_fn=_FailOnCall(call))
    module, skipped = _fit(tmp_path, cb)
    assert module.trainer.global_step == 6
    assert len(skipped) == 1 and "injected failure" in str(skipped[0].message)
    assert cb.last_metrics, "the next scheduled measurement ran"
    summary = [m for m in said if "in this fit, at step(s)" in m]
    assert len(summary) == 1 and "2 measurement(s) in this fit, at step(s) 4, 6;" in summary[0], summary
    assert "1 skipped (a warning said why), at step(s) 2;" in summary[0]


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_nan_loss_then_recovery(tmp_path, name):
    cb = CALLBACKS[name](loss_fn=_first_measurement_nan())
    module, skipped = _fit(tmp_path, cb)
    assert module.trainer.global_step == 6
    if name == "hessian":
        assert len(skipped) == 1 and "non-finite" in str(skipped[0].message).lower()
    else:  # a NaN slice is data, not a failure: it is logged as fully non-finite, then recovers
        assert not skipped
    assert cb.last_metrics and all(torch.isfinite(torch.tensor(v)) for v in cb.last_metrics.values())


def test_no_double_backward_is_skipped(tmp_path):
    model = nn.Sequential(nn.Linear(64, 16), _Fused(), nn.Linear(16, 10))
    cb = HessianCallback(every_n_train_steps=2, hvp_method="double_backward")
    module, skipped = _fit(tmp_path, cb, DigitsModule(model=model))
    assert module.trainer.global_step == 6
    assert len(skipped) == 1 and "not implemented" in str(skipped[0].message)
    assert not cb.last_metrics


def test_no_double_backward_auto_falls_back(tmp_path):
    model = nn.Sequential(nn.Linear(64, 16), _Fused(), nn.Linear(16, 10))
    cb = HessianCallback(every_n_train_steps=2)
    _, skipped = _fit(tmp_path, cb, DigitsModule(model=model))
    assert not skipped
    assert cb._resolved_method == "finite_difference"
    assert cb.last_metrics["hessian/eigenvalue_1"] > 0


@pytest.mark.parametrize("hvp_method", ["double_backward", "auto"])
def test_once_differentiable_is_skipped_or_measured_by_finite_differences(tmp_path, hvp_method):
    # PyTorch's double backward would give a wrong Hessian here without an error
    model = nn.Sequential(nn.Linear(64, 16), SoftplusAct(), nn.Linear(16, 10))
    cb = HessianCallback(every_n_train_steps=2, hvp_method=hvp_method)
    module, skipped = _fit(tmp_path, cb, DigitsModule(model=model))
    assert module.trainer.global_step == 6
    if hvp_method == "double_backward":
        assert len(skipped) == 1 and "OnceSoftplus (marked @once_differentiable)" in str(skipped[0].message)
        assert not cb.last_metrics
    else:
        assert not skipped and cb._resolved_method == "finite_difference"
        assert cb.last_metrics["hessian/eigenvalue_1"] > 0


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_strict_propagates(tmp_path, name):
    cb = CALLBACKS[name](loss_fn=_FailOnCall(2), strict=True)
    with pytest.raises(RuntimeError, match="injected failure"):
        _fit(tmp_path, cb)


def _warnings_of(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: HessianCallback(every_n_train_steps=100), "every_n_train_steps=100 and training ended at step 5"),
        (lambda: HessianCallback(every_n_epochs=3), "every_n_epochs=3 and training ended after"),
    ],
)
def test_a_fit_that_ends_before_the_first_measurement_says_so_once(tmp_path, make, why):
    cb = make()
    train, _ = loaders(n_train=192, batch_size=32)
    said = _warnings_of(lambda: trainer(tmp_path, [cb], max_steps=5, logger=False).fit(DigitsModule(), train))
    notes = [m for m in said if "no measurement was made in this fit" in m]
    assert len(notes) == 1 and why in notes[0], said


def test_the_default_schedule_measures_the_final_weights_of_a_short_fit(tmp_path):
    cb = HessianCallback()
    train, _ = loaders(n_train=192, batch_size=32)
    said = _warnings_of(lambda: trainer(tmp_path, [cb], max_steps=5, logger=False).fit(DigitsModule(), train))
    assert not [m for m in said if "no measurement was made" in m]
    assert cb._fit_steps == [5] and cb.last_metrics


def test_resuming_with_other_arguments_says_what_was_dropped(tmp_path):
    train, _ = loaders(n_train=128, batch_size=32)
    ckpt = tmp_path / "last.ckpt"
    first = trainer(tmp_path, [HessianCallback(every_n_train_steps=2, top_k=2)], max_steps=4, logger=False)
    first.fit(DigitsModule(), train)
    first.save_checkpoint(ckpt)

    def resume(cb):
        again = trainer(tmp_path, [cb], max_steps=6, max_epochs=2, logger=False)
        return again.fit(DigitsModule(), train, ckpt_path=ckpt)

    same = HessianCallback(every_n_train_steps=2, top_k=2)
    said = _warnings_of(lambda: resume(same))
    assert not [m for m in said if "other arguments" in m]
    assert same._last_step == 4 and same.eigenvectors is not None  # restored from the checkpoint
    other = HessianCallback(every_n_train_steps=2, top_k=3)
    said = _warnings_of(lambda: resume(other))
    notes = [m for m in said if "other arguments" in m]
    assert len(notes) == 1 and "top_k: 2 -> 3" in notes[0] and "eigenvectors" in notes[0], said
    assert other._last_step == -1  # not restored, and said so
