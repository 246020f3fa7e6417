"""Nothing lost: every functional measurement leaves the module and the RNGs exactly as they were."""

from __future__ import annotations

import pytest
import torch
from _models import SoftplusAct
from _state import assert_same, snapshot
from torch import nn

from lightning_landscape import functional as LF


def _bn_dropout_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )
    net[0].bias.requires_grad_(False)  # a frozen parameter stays frozen
    return net


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


MEASUREMENTS = {
    "eigenvalues": lambda m, b: LF.hessian_eigenvalues(m, _loss, b, k=2, max_hvps=10),
    "trace": lambda m, b: LF.hessian_trace(m, _loss, b, num_hvps=9),
    "density": lambda m, b: LF.hessian_density(m, _loss, b, num_probes=2, num_steps=4),
    "hvp": lambda m, b: LF.hvp(m, _loss, b, torch.ones(2, LF.ParamSpec(m).numel)),
    "train_mode_eigenvalues": lambda m, b: LF.hessian_eigenvalues(m, _loss, b, k=1, max_hvps=5, eval_mode=False),
}


@pytest.mark.parametrize("name", sorted(MEASUREMENTS))
@pytest.mark.parametrize("training", [True, False])
def test_state_untouched(name, training):
    net = _bn_dropout_net()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    _loss(net, (x, y)).backward()  # populated .grad must survive
    net.train(training)
    net[3].eval()  # mixed modes must come back exactly
    before = snapshot(net)
    MEASUREMENTS[name](net, [(x, y)])
    assert_same(before, snapshot(net))


def test_under_autocast_and_inference_mode():
    net = _bn_dropout_net()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    reference = LF.hessian_eigenvalues(net, _loss, [(x, y)], k=1, tol=1e-6).eigenvalues
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = LF.hessian_eigenvalues(net, _loss, [(x, y)], k=1, tol=1e-6).eigenvalues
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors as probe data
        under_inference = LF.hessian_eigenvalues(net, _loss, [(xi, yi)], k=1, tol=1e-6).eigenvalues
    torch.testing.assert_close(under_autocast, reference)  # measured in float32, outside autocast
    torch.testing.assert_close(under_inference, reference)


def test_selected_parameter_without_requires_grad():
    net = _bn_dropout_net()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    r = LF.hessian_eigenvalues(net, _loss, [(x, y)], params=["0.bias"], k=1)
    assert r.eigenvectors.shape == (1, 4)
    assert not net[0].bias.requires_grad


def test_sample_weighted_mean_over_batches():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    x = torch.randn(10, 3)

    def loss_fn(m, b):
        return 0.5 * m(b).pow(2).mean()

    whole = LF.hvp(model, loss_fn, [x], torch.eye(3))
    split = LF.hvp(model, loss_fn, [x[:8], x[8:]], torch.eye(3))  # 8 + 2: the short batch weighs 2/10
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(whole, x.T @ x / 10)


@pytest.mark.parametrize("method", ["double_backward", "double_backward_batched"])
def test_gradient_graph_is_built_once_per_batch(method):
    # the operator keeps each batch's gradient graph: later products only back-propagate through it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    x = torch.randn(12, 4)
    calls = []

    def loss_fn(m, b):
        calls.append(len(b))
        return m(b).pow(2).mean()

    v = torch.randn(3, sum(p.numel() for p in model.parameters()))
    # validate=False: the once-per-run product check makes forward passes of its own
    with LF.LossOperator(model, loss_fn, [x[:8], x[8:]], hvp_method=method, validate=False) as op:
        first = op.hvp(v)
        assert calls == [8, 4]
        again = op.hvp(v[:1])
        assert calls == [8, 4]  # no new forward pass
    torch.testing.assert_close(again, first[:1])
    with LF.LossOperator(model, loss_fn, [x[:8], x[8:]], hvp_method=method, cache_graph=False, validate=False) as op:
        torch.testing.assert_close(op.hvp(v), first)
        assert calls == [8, 4, 8, 4]


class _SquareNoVmap(torch.autograd.Function):
    """x**2 whose backward reads a value on the host (``.item()``), as some custom kernels' wrappers do:
    vmap, and so a batched backward through this node, cannot run it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        scale = 2.0 if g.abs().max().item() >= 0 else 0.0
        return scale * x * g


class _CubeNoVmap(torch.autograd.Function):
    """x**3 whose backward goes through ``_SquareNoVmap``: the gradient's graph holds a node vmap refuses."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * _SquareNoVmap.apply(x) * g


@pytest.mark.parametrize("vmappable", [True, False])
def test_auto_batches_blocks_of_vectors_and_falls_back_to_a_loop(vmappable):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    x = torch.randn(10, 4)

    def loss_fn(m, b):
        out = m(b)
        return (out**3 if vmappable else _CubeNoVmap.apply(out)).mean()

    v = torch.randn(4, sum(p.numel() for p in model.parameters()))
    with LF.LossOperator(model, loss_fn, [x], hvp_method="double_backward") as op:
        loop = op.hvp(v)
    with LF.LossOperator(model, loss_fn, [x]) as op:
        auto = op.hvp(v)
        assert op.method == "double_backward"
        assert op._blocks_batched is vmappable
        torch.testing.assert_close(op.hvp(v[:1]), loop[:1])  # a single vector always loops
    torch.testing.assert_close(auto, loop, rtol=1e-5, atol=1e-6)


def test_auto_method_from_an_earlier_operator_skips_the_choice_and_keeps_batching():
    # the callbacks hand each new operator what "auto" chose at their first measurement
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    x = torch.randn(10, 4)
    v = torch.randn(3, sum(p.numel() for p in model.parameters()))
    with LF.LossOperator(model, _loss_mse, [x], auto_method="double_backward") as op:
        op.hvp(v)
        assert op.probe_hvps == 0 and op.method == "double_backward" and op._blocks_batched is True
    with pytest.raises(ValueError, match="auto_method"):
        LF.LossOperator(model, _loss_mse, [x], hvp_method="double_backward", auto_method="double_backward")
    with pytest.raises(ValueError, match="auto_method"):
        LF.LossOperator(model, _loss_mse, [x], auto_method="magic")


def _loss_mse(m, b):
    return m(b).pow(2).mean()


def test_float64_losses_keep_float64():
    # a float64 model's loss must not be rounded to float32 (scientific models often run in float64)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x = torch.randn(7, 3, dtype=torch.float64)

    def loss_fn(m, b):
        return 1e4 + m(b).pow(2).mean()  # float32 would round at ~1e-3 here

    with LF.LossOperator(model, loss_fn, [x[:4], x[4:]]) as op:
        loss, _ = op.gradient()
        assert op.loss().dtype == torch.float64
        assert abs(op.loss().item() - loss_fn(model, x).item()) < 1e-10
        assert abs(loss.item() - loss_fn(model, x).item()) < 1e-10


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m, b: LF.hessian_eigenvalues(m, _loss, b, k=0), "k"),
        (lambda m, b: LF.hessian_eigenvalues(m, _loss, b, tol=0), "tol"),
        (lambda m, b: LF.hessian_trace(m, _loss, b, method="exact"), "method"),
        (lambda m, b: LF.hessian_trace(m, _loss, b, num_hvps=2), "num_hvps"),
        (lambda m, b: LF.hessian_density(m, _loss, b, num_probes=0), "num_probes"),
        (lambda m, b: LF.hessian_eigenvalues(m, "loss", b), "loss_fn"),
        (lambda m, b: LF.hessian_eigenvalues(m, _loss, []), "batches"),
        (lambda m, b: LF.hessian_eigenvalues(m, _loss, b, hvp_method="magic"), "hvp_method"),
        (lambda m, b: LF.hessian_eigenvalues(m, _loss, b, params=["nope"]), "params"),
        (lambda m, b: LF.hessian_eigenvalues(m, lambda mm, bb: mm(bb[0]).sum(1), b), "loss_fn"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    net = _bn_dropout_net()
    batch = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))]
    with pytest.raises((ValueError, TypeError), match=name):
        call(net, batch)


def test_out_of_memory_retries_with_smaller_chunks(monkeypatch):
    """A batch of products that does not fit is halved until it does (simulated on the CPU)."""
    net = _bn_dropout_net()
    batch = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    vectors = torch.randn(8, LF.ParamSpec(net).numel, generator=torch.Generator().manual_seed(0))
    reference = LF.hvp(net, _loss, batch, vectors, hvp_method="double_backward")
    with LF.LossOperator(net, _loss, batch, hvp_method="double_backward", validate=False) as op:
        real = op._local_hvp
        sizes = []

        def limited(v, *args, **kwargs):
            sizes.append(v.shape[0])
            if v.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(v, *args, **kwargs)

        monkeypatch.setattr(op, "_local_hvp", limited)
        got = op.hvp(vectors)
        assert op.chunk_size == 2
        assert sizes[:3] == [8, 4, 2]
        torch.testing.assert_close(got, reference)
        monkeypatch.setattr(op, "_local_hvp", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
        with pytest.raises(LF.MeasurementError, match="out of memory"):
            op.hvp(vectors)


def _once_model(once: bool, on_input: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5), SoftplusAct(once and not on_input), nn.Linear(5, 2)]
    if on_input:  # the custom function sees only data: no parameter's derivative passes through it
        layers.insert(0, SoftplusAct(once))
    return nn.Sequential(*layers).double()


def _once_batch():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (16,), generator=g))]


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_once_differentiable_is_refused_by_double_backward_and_auto_falls_back():
    batches = _once_batch()
    v = torch.randn(2, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = LF.hvp(_once_model(once=False), _ce, batches, v, hvp_method="double_backward")
    model = _once_model(once=True)
    # what PyTorch alone gives: no error, a wrong product (the check below is what stands in the way)
    params = list(model.parameters())
    grads = torch.autograd.grad(_ce(model, batches[0]), params, create_graph=True)
    silent = torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, LF.ParamSpec(model).split(v[0]))])
    assert (silent - exact[0]).norm() > 0.1 * exact[0].norm()
    for method in ("double_backward", "double_backward_batched"):
        with pytest.raises(LF.MeasurementError, match=r"OnceSoftplus \(marked @once_differentiable\)"):
            LF.hvp(model, _ce, batches, v, hvp_method=method)
    with LF.LossOperator(model, _ce, batches) as op:
        got = op.hvp(v)
        assert op.method == "finite_difference"
    # central differences in float64 at h ~ eps^(1/3)/8: errors far below 1e-6
    assert (got - exact).norm() < 1e-6 * exact.norm()


def test_once_differentiable_on_the_data_alone_is_not_refused():
    batches = _once_batch()
    v = torch.randn(2, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = LF.hvp(_once_model(once=False, on_input=True), _ce, batches, v, hvp_method="double_backward")
    with LF.LossOperator(_once_model(once=True, on_input=True), _ce, batches) as op:
        got = op.hvp(v)
        assert op.method == "double_backward"
    assert (got - exact).norm() < 1e-12 * exact.norm()
