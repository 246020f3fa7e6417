"""The loss operator refuses or corrects what would otherwise be a silently wrong number (issue 12, classes 2, 4, 6).

Each test fails on the operator without the corresponding check: a wrong exact product accepted, a parameter read
around ``functional_call``, a sparse gradient, half-precision weights measured in half precision, an empty
out-of-memory message.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _models import cross_entropy, dense_hessian, digits, digits_mlp
from torch import nn

import lightning_landscape.functional as LF


def _weight_norm_mlp() -> nn.Module:
    torch.manual_seed(0)
    first = nn.utils.parametrizations.weight_norm(nn.Linear(16, 6))
    return nn.Sequential(first, nn.Tanh(), nn.Linear(6, 10)).double()


def _batches(n: int = 128, dtype=torch.float64, features: int = 64):
    x, y = digits(n)
    return [(x[:, :features].to(dtype), y)]


def test_weight_norm_double_backward_is_caught_and_auto_uses_finite_differences():
    model, batches = _weight_norm_mlp(), _batches(features=16)
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(4, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # products from true gradients only (central differences, float64: errors ~1e-9 relative)
    reference = LF.hvp(model, cross_entropy, batches, v, hvp_method="finite_difference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LF.LossOperator(model, cross_entropy, batches, hvp_method="double_backward") as op:
            silent = op.hvp(v)
            assert op.product_check_failed and "failed the check" in op.product_check
    # what PyTorch's double backward gives here: wrong by far more than rounding (the issue: trace 0.991 vs 1.2585)
    assert (silent - reference).norm() > 0.01 * reference.norm(), "the test needs a wrong double backward"
    assert any("wrong Hessian-vector product" in str(w.message) for w in caught), "an explicit method warns"
    with LF.LossOperator(model, cross_entropy, batches) as op:  # auto
        got = op.hvp(v)
        assert op.method == "finite_difference"
        assert "now finite_difference" in op.product_check and "asymmetry" in op.product_check
    assert (got - reference).norm() < 1e-6 * reference.norm()
    r = LF.hessian_trace(model, cross_entropy, batches, num_hvps=9, generator=torch.Generator().manual_seed(0))
    assert r.hvp_method == "finite_difference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_correct_double_backward_passes_the_check(dtype):
    # tanh MLP and a ReLU MLP: for the ReLU net finite differences see kinks (their spread is large), which must
    # not condemn the exact product
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    for model in (digits_mlp(), relu):
        model = model.to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        batches = _batches(dtype=dtype)
        for _ in range(30):
            opt.zero_grad()
            cross_entropy(model, batches[0]).backward()
            opt.step()
        with LF.LossOperator(model, cross_entropy, batches) as op:
            op.hvp(torch.ones(1, op.size, dtype=dtype))
            assert op.method == "double_backward", op.product_check
            assert op.product_check.startswith("passed"), op.product_check


class _ListRegularized(nn.Module):
    """A loss that reads weights through a Python list built in ``__init__`` (a weight-decay term)."""

    def __init__(self, cached_all: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 8), nn.Linear(8, 10)
        self.decayed = [self.a.weight, self.b.weight]
        self.cached_all = cached_all
        self.params = list(self.parameters())

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))

    def loss(self, batch):
        held = self.params if self.cached_all else self.decayed
        return cross_entropy(self, batch) + 10.0 * sum(w.pow(2).sum() for w in held)


@pytest.mark.parametrize("cached_all", [False, True])
def test_parameters_read_through_a_list_are_refused_naming_them(cached_all):
    model = _ListRegularized(cached_all)
    batches = _batches(dtype=torch.float32, features=16)

    def loss_fn(m, b):
        return m.loss(b)

    for call in (
        lambda: LF.hessian_trace(model, loss_fn, batches, num_hvps=9),
        lambda: LF.hessian_eigenvalues(model, loss_fn, batches),
        lambda: LF.sharpness(model, loss_fn, batches, kind="average_case", samples=2),
        lambda: LF.sharpness(model, loss_fn, batches, steps=3),
        lambda: LF.loss_surface(model, loss_fn, batches, steps=3),
        lambda: LF.hvp(model, loss_fn, batches, torch.ones(1, 226), hvp_method="finite_difference"),
    ):
        with pytest.raises(LF.MeasurementError, match=r"a\.weight.*b\.weight|a\.weight"):
            call()


def test_a_regularizer_that_reads_attributes_is_measured():
    # the same loss written through the module's attributes is measured, and matches the dense Hessian
    model = _ListRegularized()
    batches = _batches(n=64, dtype=torch.float32, features=16)

    def loss_fn(m, b):
        return cross_entropy(m, b) + 10.0 * (m.a.weight.pow(2).sum() + m.b.weight.pow(2).sum())

    # exact: the cross-entropy's dense Hessian plus 20·I on the decayed weights
    exact = float(torch.trace(dense_hessian(model, cross_entropy, batches))) + 20.0 * (16 * 8 + 8 * 10)
    with LF.LossOperator(model, loss_fn, batches) as op:
        got = float(torch.diagonal(op.hvp(torch.eye(op.size))).sum())
    assert abs(got - exact) < 1e-4 * exact


class _Bag(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 4, sparse=sparse)
        self.out = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens).mean(dim=1)))


def test_sparse_embedding_is_measured_like_a_dense_one():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 20, (32, 5), generator=g), torch.randint(0, 3, (32,), generator=g))]
    dense, sparse = _Bag(sparse=False), _Bag(sparse=True)
    eye = torch.eye(LF.ParamSpec(dense).numel)
    expected = LF.hvp(dense, cross_entropy, batches, eye)
    torch.testing.assert_close(LF.hvp(sparse, cross_entropy, batches, eye), expected)
    s_dense = LF.sharpness(dense, cross_entropy, batches, steps=3)
    assert LF.sharpness(sparse, cross_entropy, batches, steps=3) == pytest.approx(s_dense, rel=1e-6)
    assert sparse.emb.sparse is True  # restored
    # and training with it still gets sparse gradients
    cross_entropy(sparse, batches[0]).backward()
    assert sparse.emb.weight.grad.is_sparse


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_measured_in_float32(half):
    # a bf16/fp16 model (as under precision="bf16-true"/"16-true") is measured in float32 on its own weights:
    # the same numbers as a float32 model holding those (rounded) weights, to float32 rounding
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 10)).to(half)
    twin = copy.deepcopy(model).float()
    x, y = digits(128)
    batches_half, batches_32 = [(x.to(half), y)], [(x.to(half).float(), y)]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = LF.hessian_eigenvalues(model, cross_entropy, batches_half, k=2, generator=gen())
    b = LF.hessian_eigenvalues(twin, cross_entropy, batches_32, k=2, generator=gen())
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-5, atol=0)
    assert a.eigenvectors.dtype == torch.float32
    sa = LF.sharpness(model, cross_entropy, batches_half, steps=5)
    sb = LF.sharpness(twin, cross_entropy, batches_32, steps=5)
    assert sa == pytest.approx(sb, rel=1e-4)
    la = LF.loss_surface(model, cross_entropy, batches_half, steps=3, generator=gen())
    lb = LF.loss_surface(twin, cross_entropy, batches_32, steps=3, generator=gen())
    torch.testing.assert_close(la.losses, lb.losses, rtol=1e-5, atol=0)
    assert all(p.dtype == half for p in model.parameters())  # the model itself is untouched


def test_out_of_memory_keeps_the_message_and_gradients_split_the_batch():
    torch.manual_seed(0)
    model = digits_mlp()
    batches = _batches(n=64, dtype=torch.float32)
    reference = LF.sharpness(model, cross_entropy, batches, steps=4)
    sizes = []

    def limited(m, b):
        sizes.append(len(b[0]))
        if len(b[0]) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return cross_entropy(m, b)

    got = LF.sharpness(model, limited, batches, steps=4)
    # float32 losses summed over quarters instead of the whole batch: L ≈ 2.3 rounds at ~2e-7, and the
    # sharpness (a difference of two losses, ~0.02) moves by ~1e-5 of itself
    assert got == pytest.approx(reference, rel=1e-4)
    assert max(sizes[-5:]) == 16  # halved twice, then kept

    def always(m, b):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    with pytest.raises(LF.MeasurementError, match=r"Tried to allocate 2\.00 GiB"):
        LF.sharpness(model, always, batches, steps=2)
    with pytest.raises(LF.MeasurementError, match=r"Tried to allocate 2\.00 GiB"):
        LF.hessian_eigenvalues(model, always, batches)
