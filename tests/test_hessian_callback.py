"""HessianCallback in a real Trainer.fit: schedule, TensorBoard contents, state, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from _lightning import DigitsModule, fitted_weights, loaders, read_events, scalar_steps, trainer
from _models import cross_entropy

from lightning_landscape import HessianCallback
from lightning_landscape import functional as LF


def test_scalars_in_event_file_at_scheduled_steps(tmp_path):
    train, _ = loaders(n_train=320, batch_size=32)  # 10 steps per epoch
    cb = HessianCallback(every_n_train_steps=4, top_k=2, trace=True, density=True, trace_hvps=30)
    module = DigitsModule(lr=0.2, momentum=0.9)
    trainer(tmp_path, [cb], max_epochs=2).fit(module, train)
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    expected = {
        "hessian/eigenvalue_1",
        "hessian/eigenvalue_2",
        "hessian/trace",
        "hessian/num_hvps",
        "hessian/seconds",
        "hessian/eos_ratio",
    }
    assert expected <= tags
    assert sorted(scalar_steps(acc, "hessian/eigenvalue_1")) == [4, 8, 12, 16, 20]
    assert [e.step for e in acc.Images("hessian/spectral_density")] == [4, 8, 12, 16, 20]
    # the last logged eigenvalue is the top eigenvalue at the final weights on the probe batch
    probe = cb._probe
    exact = LF.hessian_eigenvalues(module, cross_entropy, probe, k=1, tol=1e-6).eigenvalues[0].item()
    assert scalar_steps(acc, "hessian/eigenvalue_1")[20] == pytest.approx(exact, rel=1e-3)
    eos = scalar_steps(acc, "hessian/eos_ratio")[20]
    assert eos == pytest.approx(0.2 * scalar_steps(acc, "hessian/eigenvalue_1")[20] / (2 + 2 * 0.9), rel=1e-6)
    assert scalar_steps(acc, "hessian/eigenvalue_1")[20] >= scalar_steps(acc, "hessian/eigenvalue_2")[20]


def test_every_n_epochs_and_warm_start(tmp_path):
    train, _ = loaders(n_train=128, batch_size=32)
    cb = HessianCallback(every_n_epochs=1, top_k=1, tol=1e-4)
    trainer(tmp_path, [cb], max_epochs=3, logger=False).fit(DigitsModule(lr=0.05), train)
    assert cb.eigenvectors is not None and cb.eigenvectors.shape == (1, 1810)
    state = cb.state_dict()
    restored = HessianCallback(every_n_epochs=1, top_k=1)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored._last_epoch == 3
    assert torch.equal(restored.eigenvectors, cb.eigenvectors)
    assert torch.equal(restored.generator.get_state(), cb.generator.get_state())


def test_training_unchanged_by_callback(tmp_path):
    """Same fit with and without the callback: bitwise-equal weights (CPU, deterministic)."""
    plain = fitted_weights(tmp_path, [])
    cb = HessianCallback(every_n_train_steps=2, top_k=2, trace=True, trace_hvps=12, density=True, density_steps=5)
    watched = fitted_weights(tmp_path, [cb])
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_uses_training_step_without_logging(tmp_path):
    train, _ = loaders(n_train=64, batch_size=32)
    module = DigitsModule()
    cb = HessianCallback(every_n_train_steps=1)
    t = trainer(tmp_path, [cb], max_steps=2)
    t.fit(module, train)
    # `train_loss` logged once per step by training_step; the callback's own calls are silenced
    assert "hessian/eigenvalue_1" in cb.last_metrics
    assert "log" not in module.__dict__


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(every_n_train_steps=1, every_n_epochs=1), "every_n_train_steps"),
        (dict(every_n_epochs=1, max_overhead=0.1), "max_overhead"),
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(every_n_train_steps=-2), "every_n_train_steps"),
        (dict(every_n_epochs=1, top_k=0), "top_k"),
        (dict(every_n_epochs=1, num_batches=0), "num_batches"),
        (dict(every_n_epochs=1, loss_fn="mse"), "loss_fn"),
        (dict(every_n_epochs=1, hvp_method="magic"), "hvp_method"),
        (dict(every_n_epochs=1, tol=0), "tol"),
        (dict(every_n_epochs=1, max_hvps=2, top_k=3), "max_hvps"),
        (dict(every_n_epochs=1, trace=True, trace_hvps=2), "trace_hvps"),
        (dict(every_n_epochs=1, density_steps=0), "density_steps"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        HessianCallback(**kwargs)


def test_loss_fn_returning_non_scalar_is_named(tmp_path):
    train, _ = loaders(n_train=64, batch_size=32)
    cb = HessianCallback(
        every_n_train_steps=1,
        loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
        strict=True,
    )
    with pytest.raises(ValueError, match="loss_fn"):
        trainer(tmp_path, [cb], max_steps=1, logger=False).fit(DigitsModule(), train)


def test_failed_measurement_warns_and_training_goes_on(tmp_path):
    train, _ = loaders(n_train=64, batch_size=32)
    cb = HessianCallback(
        every_n_train_steps=1, loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    )
    module = DigitsModule()
    with pytest.warns(UserWarning, match="skipped the measurement"):
        trainer(tmp_path, [cb], max_steps=2, logger=False).fit(module, train)
    assert module.trainer.global_step == 2


def test_eigenvalue_1_stderr_is_the_spread_of_the_rayleigh_quotient_over_probe_batches(tmp_path):
    # the logged probe dependence equals the spread of v1ᵀH_b v1 over the probe batches, computed densely
    import math

    from _models import dense_hessian

    train, _ = loaders(n_train=256, batch_size=32, shuffle=False)
    cb = HessianCallback(every_n_epochs=1, num_samples=128, tol=1e-6, max_hvps=200)
    module = DigitsModule()
    trainer(tmp_path, [cb], logger=False).fit(module, train)
    probe = cb._probe
    assert len(probe) == 4
    v = cb.eigenvectors[0].double()
    quotients = [float(v @ dense_hessian(module.net, cross_entropy, [b]) @ v) for b in probe]
    mean = sum(quotients) / 4
    spread = math.sqrt(sum((q - mean) ** 2 for q in quotients) / 4)
    assert cb.last_metrics["hessian/eigenvalue_1"] == pytest.approx(mean, rel=1e-4)
    assert cb.last_metrics["hessian/eigenvalue_1_stderr"] == pytest.approx(spread / 2, rel=1e-3)


@pytest.mark.parametrize("method", ["double_backward_batched", "forward_over_reverse", "finite_difference"])
def test_the_probe_spread_works_with_every_product_method(tmp_path, method):
    train, _ = loaders(n_train=128, batch_size=32, shuffle=False)
    cb = HessianCallback(every_n_epochs=1, num_batches=2, hvp_method=method, strict=True)
    trainer(tmp_path, [cb], logger=False).fit(DigitsModule(), train)
    assert cb.last_metrics["hessian/eigenvalue_1_stderr"] > 0
