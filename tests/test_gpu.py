"""On a CUDA device: the measurements, SAM in 16-mixed precision, and the "nothing lost" invariant.

Skipped without a GPU (CI has none); ``python benchmarks/gpu_check.py`` runs them on one. TF32 is off
for these comparisons (matrix products and convolutions), so float32 on the GPU is compared with float32
or float64 on the CPU at float32 accuracy.
"""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from _lightning import DigitsModule, loaders, read_events, scalar_steps, trainer
from _models import cross_entropy, dense_hessian, digits, digits_mlp
from torch import nn

from lightning_landscape import HessianCallback, LossLandscapeCallback, SharpnessCallback
from lightning_landscape import functional as LF

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("method", ["double_backward", "double_backward_batched", "forward_over_reverse", "auto"])
def test_top_eigenvalues_on_cuda_match_the_dense_hessian(method):
    x, y = digits(256)
    model = digits_mlp()
    exact = torch.linalg.eigvalsh(dense_hessian(copy.deepcopy(model).double(), cross_entropy, [(x.double(), y)]))
    gpu = model.cuda()
    result = LF.hessian_eigenvalues(gpu, cross_entropy, [(x.cuda(), y.cuda())], k=2, tol=1e-6, hvp_method=method)
    top = exact.flip(0)[:2]
    assert torch.allclose(result.eigenvalues.double().cpu(), top, rtol=1e-4), (result.eigenvalues, top)


def test_callbacks_in_a_cuda_fit_log_what_the_cpu_computes(tmp_path):
    train, val = loaders(n_train=384, batch_size=32)
    cbs = [
        HessianCallback(every_n_train_steps=4, top_k=2, trace=True, density=True, trace_hvps=30),
        SharpnessCallback(every_n_train_steps=4, steps=5, samples=5),
        LossLandscapeCallback(every_n_train_steps=4, steps=5),
    ]
    module = DigitsModule(lr=0.2)
    trainer(tmp_path, cbs, accelerator="gpu", max_steps=12).fit(module, train, val)
    acc = read_events(tmp_path)
    assert sorted(scalar_steps(acc, "hessian/eigenvalue_1")) == [4, 8, 12]
    assert [e.step for e in acc.Images("landscape/surface_2d")] == [4, 8, 12]
    assert cbs[0]._probe[0][0].device.type == "cuda"
    # the last frame, recomputed on the CPU in float64 from the same weights and probe batch
    cpu = copy.deepcopy(module).cpu().double()
    probe = [(x.cpu().double(), y.cpu()) for x, y in cbs[0]._probe]
    exact = LF.hessian_eigenvalues(cpu, cross_entropy, probe, k=1, tol=1e-9).eigenvalues[0].item()
    assert scalar_steps(acc, "hessian/eigenvalue_1")[12] == pytest.approx(exact, rel=1e-4)
    land_probe = [(x.cpu().double(), y.cpu()) for x, y in cbs[2]._probe]
    center = LF.loss_surface(cpu, cross_entropy, land_probe, steps=3).center_loss
    assert scalar_steps(acc, "landscape/center_loss")[12] == pytest.approx(center, rel=1e-5)
    assert scalar_steps(acc, "sharpness/worst_case_l2")[12] > 0


def test_training_on_cuda_is_bitwise_unchanged_by_the_callbacks(tmp_path):
    from test_nothing_lost import _all_callbacks, _fit

    cbs = _all_callbacks()
    with_cbs, _ = _fit(tmp_path, cbs, accelerator="gpu")
    without, _ = _fit(tmp_path, [], accelerator="gpu")
    assert all(cb.last_metrics for cb in cbs)
    for key, value in without.items():
        assert torch.equal(with_cbs[key], value), key


def test_sam_16_mixed_on_cuda_matches_an_autocast_reference(tmp_path):
    from test_sam import LR, RHO, SAMDigits, max_diff, train_batches

    module = SAMDigits(lr=LR, sam=True)
    start = copy.deepcopy(module.net)
    t = trainer(tmp_path, [], accelerator="gpu", max_steps=2, max_epochs=-1, precision="16-mixed", logger=False)
    train, _ = loaders(shuffle=False)
    t.fit(module, train)
    assert t.precision_plugin.scaler is not None and t.precision_plugin.scaler.get_scale() == 2.0**16

    def reference(rho: float) -> list[torch.Tensor]:
        model = copy.deepcopy(start).cuda()
        params = list(model.parameters())
        for x, y in train_batches(2):
            x, y = x.cuda(), y.cuda()

            def grads(x: torch.Tensor = x, y: torch.Tensor = y) -> tuple[torch.Tensor, ...]:
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = nn.functional.cross_entropy(model(x), y)
                return torch.autograd.grad(loss, params)

            g = grads()
            with torch.no_grad():
                norm = torch.sqrt(sum((gi.float() ** 2).sum() for gi in g))
                eps = [rho * gi / norm for gi in g]
                for p, e in zip(params, eps, strict=True):
                    p.add_(e)
            gs = grads()
            with torch.no_grad():
                for p, e, gi in zip(params, eps, gs, strict=True):
                    p.sub_(e).sub_(LR * gi)
        return [p.detach().cpu() for p in params]

    expected, plain = reference(RHO), reference(1e-12)
    got = [p.detach().cpu() for p in module.net.parameters()]
    # the scaled loss's float16 gradients round differently from the unscaled reference's
    assert max_diff(got, expected) < 1e-4
    assert max_diff(plain, expected) > 5e-4


def test_default_schedule_on_cuda_measures_within_its_share(tmp_path):
    import time

    class SlowSteps(pl.Callback):
        def on_train_batch_end(self, *args):
            time.sleep(0.02)

    train, val = loaders(n_train=1280, batch_size=8)  # 160 steps, > 3.2 s
    cbs = [cls(max_overhead=0.3) for cls in (HessianCallback, SharpnessCallback, LossLandscapeCallback)]
    start = time.perf_counter()
    trainer(tmp_path, [SlowSteps(), *cbs], accelerator="gpu").fit(DigitsModule(), train, val)
    wall = time.perf_counter() - start
    assert all(cb.last_metrics for cb in cbs), [cb._spent_seconds for cb in cbs]
    for cb in cbs:  # each within its share of the time not spent measuring, plus at most one measurement
        other = wall - sum(c._spent_seconds for c in cbs)
        assert cb._spent_seconds <= 0.3 * other + cb._budget.last_cost
