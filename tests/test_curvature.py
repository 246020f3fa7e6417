"""GGN and Fisher operators against dense float64 matrices built explicitly (Jacobian × closed-form H_loss × Jᵀ).

Every reference is float64 and every product is exact arithmetic up to rounding, so products agree with the dense
matrices to ~1e-13; eigenvalues from Lanczos at ``tol=1e-8`` agree to far better than the 1e-4 the issue asks.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _models import dense_hessian
from torch import Tensor, nn
from torch.func import functional_call

from lightning_landscape.functional.curvature import CurvatureOperator, curvature_operator
from lightning_landscape.functional.eigen import hessian_eigenvalues, top_eigenvalues
from lightning_landscape.functional.hvp import LossOperator
from lightning_landscape.functional.trace import hessian_density, hessian_trace


@pytest.fixture(autouse=True)
def _float64():
    """Every tensor a test makes is float64 (the default dtype is restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _flat_fn(model: nn.Module, output_fn):
    """``θ ↦ output`` on a flat float64 parameter vector (for torch.autograd.functional.jacobian)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    sizes = [s.numel() for s in shapes]
    flat0 = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])

    def f(flat: Tensor, batch) -> Tensor:
        params = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return functional_call(model, params, (batch[0],)) if output_fn is None else output_fn(model, params, batch)

    return f, flat0


def _h_loss(out: Tensor, loss: str) -> Tensor:
    """The closed-form Hessian of the mean-reduced output loss in the flattened output."""
    if loss == "mse":
        return 2.0 / out.numel() * torch.eye(out.numel())
    c = out.shape[1]
    p = out.movedim(1, -1).reshape(-1, c).softmax(-1)  # [units, C]
    blocks = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    h = torch.block_diag(*blocks) / p.shape[0]  # in the order (units, C)
    # reorder to the output's own flattening [N, C, *rest]
    index = torch.arange(out.numel()).reshape(out.shape).movedim(1, -1).reshape(-1)
    perm = torch.empty_like(index)
    perm[index] = torch.arange(out.numel())
    return h[perm][:, perm]


def dense_ggn(model: nn.Module, batches, loss: str, output_fn=None) -> Tensor:
    """``Σ_b w_b J_bᵀ H_loss J_b`` in float64, model in eval mode."""
    model = copy.deepcopy(model).double().eval()
    f, flat0 = _flat_fn(model, output_fn)
    total = sum(len(b[0]) for b in batches)
    g = 0
    for b in batches:
        out = f(flat0, b).detach()
        j = torch.autograd.functional.jacobian(lambda t, b=b: f(t, b), flat0).reshape(out.numel(), -1)
        g = g + len(b[0]) / total * j.T @ _h_loss(out, loss) @ j
    return g


def _eig_rel_error(result, exact: Tensor) -> float:
    return float(((result.eigenvalues - exact).abs() / exact.abs()).max())


def _setup(case: str):
    g = torch.Generator().manual_seed(0)
    if case == "mlp_ce":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
        x = torch.randn(20, 6, generator=g, dtype=torch.float64)
        batches = [(x[:12], torch.randint(0, 4, (12,), generator=g)), (x[12:], torch.randint(0, 4, (8,), generator=g))]
        return model, batches, "cross_entropy"
    if case == "mlp_mse":
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        return model, [(x, torch.randn(16, 3, generator=g, dtype=torch.float64))], "mse"
    if case == "cnn_bn":
        torch.manual_seed(2)
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)
        ).double()
        bn = model[1]
        bn.running_mean.copy_(torch.randn(3, generator=g) * 0.3)  # non-trivial statistics: eval mode must use them
        bn.running_var.copy_(torch.rand(3, generator=g) + 0.5)
        x = torch.randn(10, 1, 6, 6, generator=g, dtype=torch.float64)
        return model, [(x, torch.randint(0, 3, (10,), generator=g))], "cross_entropy"
    # a tiny transformer: embedding by a linear map, one encoder layer (d_model 8), mean-pooled, 3 classes
    torch.manual_seed(3)
    model = _TinyTransformer().double()
    x = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    return model, [(x, torch.randint(0, 3, (6,), generator=g))], "cross_entropy"


class _TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x)).mean(dim=1))


CASES = ["mlp_ce", "mlp_mse", "cnn_bn", "transformer"]


@pytest.mark.parametrize("case", CASES)
def test_ggn_products_and_top3_match_the_dense_ggn(case):
    model, batches, loss = _setup(case)
    dense = dense_ggn(model, batches, loss)
    exact = torch.linalg.eigvalsh(dense).flip(0)
    with CurvatureOperator(model, batches, curvature="ggn", output_loss=loss) as op:
        products = op.matmat(torch.eye(op.size))
        # float64 products of the same matrix: rounding only (1e-10 of the largest entry is ~1e3 ulps)
        assert torch.allclose(products, dense, atol=1e-10 * dense.abs().max(), rtol=0)
        result = top_eigenvalues(op, k=3, tol=1e-8, max_hvps=200)
    # forward mode throughout; fused attention has none, so the transformer's attention runs the math backend
    method = "ggn/jvp+math_sdpa" if case == "transformer" else "ggn/jvp"
    assert result.converged and op.method == method
    assert _eig_rel_error(result, exact[:3]) < 1e-4  # the tolerance (tol=1e-8 makes it ~1e-8)
    # the public function gives the same (the operator is what it builds)
    r = hessian_eigenvalues(model, None, batches, k=3, tol=1e-8, max_hvps=200, curvature="ggn", output_loss=loss)
    assert _eig_rel_error(r, exact[:3]) < 1e-4 and r.hvp_method == method


@pytest.mark.parametrize("case", ["mlp_mse", "cnn_bn"])
def test_ggn_trace_is_exact_when_the_sketch_spans_the_space(case):
    model, batches, loss = _setup(case)
    dense = dense_ggn(model, batches, loss)
    n = dense.shape[0]
    # Hutch++ with a sketch of n random vectors: Q spans the whole space, so tr(QᵀGQ) is the trace to rounding
    t = hessian_trace(model, None, batches, 3 * n, curvature="ggn", output_loss=loss)
    assert abs(t.estimate - float(dense.trace())) < 1e-9 * float(dense.trace())


def test_ggn_smallest_eigenvalues_of_a_full_rank_ggn():
    # 26 parameters, 64 samples × 2 outputs: the GGN is positive definite, its smallest eigenvalues well defined
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    batches = [(torch.randn(64, 5, generator=g), torch.randn(64, 2, generator=g))]
    exact = torch.linalg.eigvalsh(dense_ggn(model, batches, "mse"))
    assert exact[0] > 1e-6 * exact[-1]
    r = hessian_eigenvalues(
        model, None, batches, k=2, tol=1e-10, max_hvps=80, curvature="ggn", output_loss="mse", which="smallest"
    )
    assert r.converged and _eig_rel_error(r, exact[:2]) < 1e-4


def test_ggn_equals_the_hessian_for_a_linear_model_with_mse():
    g = torch.Generator().manual_seed(5)
    model = nn.Linear(4, 3).double()
    batches = [(torch.randn(9, 4, generator=g), torch.randn(9, 3, generator=g)) for _ in range(2)]
    hessian = dense_hessian(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), batches)
    with CurvatureOperator(model, batches, curvature="ggn", output_loss="mse") as op:
        ggn = op.matmat(torch.eye(op.size))
    with curvature_operator(model, None, batches, curvature="hessian", output_loss="mse") as op:
        hess_op = op.matmat(torch.eye(op.size))
    assert (ggn - hessian).abs().max() < 1e-10  # entries are O(1): 1e-10 is rounding with a wide margin
    assert (hess_op - hessian).abs().max() < 1e-10


def test_a_callable_output_loss_gives_the_built_in_ggn():
    model, batches, _ = _setup("mlp_ce")
    with CurvatureOperator(model, batches, output_loss="cross_entropy") as op:
        builtin = op.matmat(torch.eye(op.size))
    with CurvatureOperator(model, batches, output_loss=lambda out, b: F.cross_entropy(out, b[1])) as op:
        autograd = op.matmat(torch.eye(op.size))
    assert (builtin - autograd).abs().max() < 1e-12


def test_token_level_cross_entropy_classes_along_dim_1():
    # output [N, C, T] (F.cross_entropy's layout for sequences): each position is a unit of the mean
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(6)
    model = nn.Linear(4, 3).double()

    def output_fn(m, b):
        return m(b[0]).transpose(1, 2)  # [N, T, 4] -> [N, T, 3] -> [N, 3, T]

    batches = [(torch.randn(5, 7, 4, generator=g), torch.randint(0, 3, (5, 7), generator=g))]
    dense = dense_ggn(model, batches, "cross_entropy", lambda m, p, b: functional_call(m, p, (b[0],)).transpose(1, 2))
    with CurvatureOperator(model, batches, output_fn=output_fn, output_loss="cross_entropy") as op:
        assert (op.matmat(torch.eye(op.size)) - dense).abs().max() < 1e-12


def _per_sample_gradients(model: nn.Module, batches, loss_of_output) -> list[tuple[float, Tensor]]:
    total = sum(len(b[0]) for b in batches)
    out = []
    for b in batches:
        for i in range(len(b[0])):
            sample = tuple(t[i : i + 1] for t in b)
            loss = loss_of_output(model(sample[0]), sample)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            out.append((1.0 / total, torch.cat([g.reshape(-1) for g in grads])))
    return out


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "callable"])
def test_empirical_fisher_is_the_mean_of_per_sample_gradient_outer_products(loss):
    model, batches, _ = _setup("mlp_ce" if loss != "mse" else "mlp_mse")
    if loss == "callable":  # a smooth mean-reduced loss of our own: mean over samples of log-cosh of the outputs
        output_loss = lambda out, b: torch.log(torch.cosh(out - b[1][:, None])).sum(1).mean()  # noqa: E731
    else:
        output_loss = {"cross_entropy": lambda o, b: F.cross_entropy(o, b[1]), "mse": lambda o, b: F.mse_loss(o, b[1])}[
            loss
        ]
    dense = sum(w * torch.outer(g, g) for w, g in _per_sample_gradients(model, batches, output_loss))
    with CurvatureOperator(
        model, batches, curvature="empirical_fisher", output_loss=output_loss if loss == "callable" else loss
    ) as op:
        products = op.matmat(torch.eye(op.size))
    assert (products - dense).abs().max() < 1e-12 * max(1.0, float(dense.abs().max()))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_monte_carlo_fisher_converges_to_the_ggn(loss):
    # the exact Fisher of these losses (their negative log-likelihoods) is the GGN; the MC Fisher is its sample mean.
    # Each unit's output-space matrix is the mean of S = 4000 i.i.d. rank-one draws: relative standard error
    # ~1/√S ≈ 1.6% per unit and less after summing units; 0.1 is several standard errors, and a wrongly scaled
    # or wrongly centred Fisher (off by a factor, or using p instead of p - onehot) is off by O(1)
    model, batches, _ = _setup("mlp_ce" if loss == "cross_entropy" else "mlp_mse")
    ggn = dense_ggn(model, batches, loss)
    gen = torch.Generator().manual_seed(7)
    rng = torch.get_rng_state()
    with CurvatureOperator(model, batches, curvature="fisher", output_loss=loss, mc_samples=4000, generator=gen) as op:
        fisher = op.matmat(torch.eye(op.size))
        again = op.matmat(torch.eye(op.size))
    assert torch.equal(torch.get_rng_state(), rng)  # drawn from the given generator, never the global RNG
    assert torch.equal(fisher, again)  # drawn once per operator: one fixed symmetric matrix for Lanczos
    assert torch.allclose(fisher, fisher.T, atol=1e-12)
    assert float((fisher - ggn).norm() / ggn.norm()) < 0.1
    # and one draw each is a different matrix of the same expectation
    with CurvatureOperator(model, batches, curvature="fisher", output_loss=loss, generator=gen) as op:
        one = op.matmat(torch.eye(op.size))
    assert float((one - ggn).norm() / ggn.norm()) > float((fisher - ggn).norm() / ggn.norm())


@pytest.mark.parametrize("mc_samples", [3, 6])  # fewer draws than classes (kept as draws), more (kept as C×C)
def test_monte_carlo_fisher_is_the_mean_over_its_draws(mc_samples):
    # the same draws, replayed from a generator with the same seed: F = Σ_b w_b J_bᵀ (mean over units and draws of
    # g gᵀ, g = p - onehot(ŷ)) J_b, exactly (float64 rounding)
    model, batches, _ = _setup("mlp_ce")
    ref = copy.deepcopy(model).eval()
    f, flat0 = _flat_fn(ref, None)
    replay = torch.Generator().manual_seed(9)
    total = sum(len(b[0]) for b in batches)
    dense = 0
    for b in batches:
        out = f(flat0, b).detach()
        p = out.softmax(1)
        draws = torch.multinomial(p, mc_samples, replacement=True, generator=replay)
        g = p[:, None, :] - F.one_hot(draws, p.shape[1]).double()  # [N, s, C]
        m = torch.block_diag(*torch.einsum("nsc,nsd->ncd", g, g)) / mc_samples / len(out)
        j = torch.autograd.functional.jacobian(lambda t, b=b: f(t, b), flat0).reshape(out.numel(), -1)
        dense = dense + len(out) / total * j.T @ m @ j
    gen = torch.Generator().manual_seed(9)
    with CurvatureOperator(model, batches, curvature="fisher", mc_samples=mc_samples, generator=gen) as op:
        assert (op.matmat(torch.eye(op.size)) - dense).abs().max() < 1e-12


def test_fisher_through_the_public_functions_is_reproducible():
    model, batches, _ = _setup("mlp_ce")
    kw = {"curvature": "fisher", "output_loss": "cross_entropy", "mc_samples": 2}
    a = hessian_trace(model, None, batches, 30, generator=torch.Generator().manual_seed(1), **kw)
    b = hessian_trace(model, None, batches, 30, generator=torch.Generator().manual_seed(1), **kw)
    assert a.estimate == b.estimate and a.hvp_method == "fisher/jvp"
    d = hessian_density(model, None, batches, num_steps=8, **kw)
    assert float(d.nodes[torch.isfinite(d.nodes)].min()) > -1e-10  # a Fisher is positive semi-definite


class _NoForwardModeSoftplus(torch.autograd.Function):
    """softplus as an old-style autograd Function: differentiable backward, but no forward mode (no jvp)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class _Softplus(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        self.custom = custom

    def forward(self, x):
        return _NoForwardModeSoftplus.apply(x) if self.custom else F.softplus(x)


def test_double_vjp_fallback_where_forward_mode_is_missing():
    torch.manual_seed(8)
    g = torch.Generator().manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), _Softplus(custom=True), nn.Linear(5, 3)).double()
    batches = [(torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g))]
    plain = copy.deepcopy(model)
    plain[1].custom = False
    with CurvatureOperator(plain, batches) as op:
        reference = op.matmat(torch.eye(op.size))
    with pytest.warns(RuntimeWarning, match="double-vjp"), CurvatureOperator(model, batches) as op:
        products = op.matmat(torch.eye(op.size))
        assert op.method == "ggn/double_vjp"
    assert (products - reference).abs().max() < 1e-12


def test_the_model_is_left_exactly_as_found():
    model, batches, _ = _setup("cnn_bn")
    model.train()
    model[1].momentum = 0.9
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    for curvature in ("ggn", "fisher", "empirical_fisher"):
        for eval_mode in (True, False):
            with CurvatureOperator(model, batches, curvature=curvature, eval_mode=eval_mode) as op:
                op.matmat(torch.randn(3, op.size, generator=torch.Generator().manual_seed(0)))
                op.loss()
                op.gradient()
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


def test_loss_and_gradient_are_those_of_the_composed_loss():
    model, batches, _ = _setup("mlp_ce")
    with (
        CurvatureOperator(model, batches) as op,
        LossOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches) as ref,
    ):
        assert torch.allclose(op.loss(), ref.loss(), rtol=1e-14)
        assert torch.allclose(op.gradient()[1], ref.gradient()[1], rtol=1e-12, atol=1e-14)


def test_bad_input_is_refused_at_call_time():
    model, batches, _ = _setup("mlp_ce")
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    with pytest.raises(ValueError, match="output_loss='cross_entropy'"):  # a loss it cannot split: says what to pass
        hessian_eigenvalues(model, loss_fn, batches, curvature="ggn")
    with pytest.raises(ValueError, match="`curvature` must be one of"):
        hessian_trace(model, loss_fn, batches, curvature="gauss-newton")
    with pytest.raises(ValueError, match="not both"):
        hessian_eigenvalues(model, loss_fn, batches, curvature="ggn", output_loss="mse")
    with pytest.raises(ValueError, match="`output_loss` must be one of"):
        CurvatureOperator(model, batches, output_loss="nll")
    with pytest.raises(ValueError, match="Monte-Carlo"):
        CurvatureOperator(model, batches, curvature="fisher", output_loss=loss_fn)
    with pytest.raises(ValueError, match="`mc_samples` must be >= 1"):
        CurvatureOperator(model, batches, curvature="fisher", mc_samples=0)
    with pytest.raises(ValueError, match="`curvature` must be one of"):
        CurvatureOperator(model, batches, curvature="hessian")
    with pytest.raises(ValueError, match="`loss_fn` is None"):
        hessian_trace(model, None, batches)
    flat = [(batches[0][0], batches[0][1].double())]
    with (
        pytest.raises(ValueError, match="classes along dim 1"),
        CurvatureOperator(model, flat, output_fn=lambda m, b: m(b[0]).sum(1)) as op,
    ):
        op.matmat(torch.ones(1, op.size))


def test_reduce_fn_makes_the_mean_over_processes():
    # two "processes" holding the same probe data (reduce_fn: the sum of two equal shares): the same matrix, so
    # counts and products both went through the reduction (a product left unreduced would come out halved)
    model, batches, _ = _setup("mlp_ce")
    calls = []

    def twice(t: Tensor) -> Tensor:
        calls.append(t.shape)
        return 2 * t

    with CurvatureOperator(model, batches) as op:
        alone = op.matmat(torch.eye(op.size))
    with CurvatureOperator(model, batches, reduce_fn=twice) as op:
        reduced = op.matmat(torch.eye(op.size))
    assert (alone - reduced).abs().max() < 1e-14 and len(calls) >= 2


def test_a_sharded_model_is_refused_for_curvature_other_than_the_hessian(monkeypatch):
    import lightning_landscape.functional.curvature as curvature

    model, batches, _ = _setup("mlp_ce")
    monkeypatch.setattr(curvature, "is_sharded", lambda m: True)  # (an FSDP2 model needs a process group)
    with pytest.raises(ValueError, match="sharded"):
        hessian_trace(model, None, batches, curvature="ggn", output_loss="cross_entropy")


def test_eigenvalues_of_an_indefinite_callable_loss_ggn():
    # a callable loss whose output Hessian is indefinite makes an indefinite GGN: both ends against the dense matrix
    model, batches, _ = _setup("mlp_mse")
    output_loss = lambda out, b: (out.pow(3).sum(1) - b[1].sum(1)).pow(2).mean() / 10  # noqa: E731
    f, flat0 = _flat_fn(copy.deepcopy(model).eval(), None)
    out = f(flat0, batches[0]).detach().requires_grad_(True)
    h_out = torch.autograd.functional.hessian(lambda o: output_loss(o, batches[0]), out).reshape(out.numel(), -1)
    j = torch.autograd.functional.jacobian(lambda t: f(t, batches[0]), flat0).reshape(out.numel(), -1)
    exact = torch.linalg.eigvalsh(j.T @ h_out @ j)
    r = hessian_eigenvalues(
        model, None, batches, k=1, tol=1e-10, max_hvps=80, curvature="ggn", output_loss=output_loss, which="both"
    )
    assert r.converged
    assert math.isclose(float(r.largest[0]), float(exact[-1]), rel_tol=1e-4)
    assert math.isclose(float(r.smallest[0]), float(exact[0]), rel_tol=1e-4)
