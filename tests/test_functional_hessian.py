"""The Hessian estimators against a dense float64 Hessian of a small MLP on scikit-learn's digits.

Reference points: the MLP at initialization (an indefinite Hessian) and after 300 full-batch
SGD steps (near a minimum, where the spectrum has a few outliers above a bulk — the regime
the estimators are meant for). Tolerances are the issue's; float32 products carry ~1e-6
relative noise, far below them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import cross_entropy, dense_hessian, digits, digits_mlp

from lightning_landscape import functional as LF


def _train(model, x, y, steps: int, lr: float = 0.5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        cross_entropy(model, (x, y)).backward()
        opt.step()


@pytest.fixture(scope="module")
def data():
    x, y = digits(512)
    # uneven batches: the short last one must count for its 50 samples only
    return x, y, [(x[:200], y[:200]), (x[200:400], y[200:400]), (x[400:450], y[400:450])]


@pytest.fixture(scope="module")
def trained(data):
    x, y, _batches = data
    model = digits_mlp()
    _train(model, x, y, 300)
    return model


def _spectrum(model, batches):
    h = dense_hessian(model, cross_entropy, batches)
    return h, torch.linalg.eigvalsh(h).flip(0)


@pytest.fixture(scope="module")
def init_model():
    return digits_mlp()


@pytest.fixture(scope="module")
def init_spectrum(data, init_model):
    return _spectrum(init_model, data[2])


@pytest.fixture(scope="module")
def trained_spectrum(data, trained):
    return _spectrum(trained, data[2])


@pytest.mark.parametrize("point", ["init", "trained"])
def test_top1_cold_start(data, point, request):
    batches = data[2]
    model = request.getfixturevalue(f"{point}_model" if point == "init" else point)
    _, exact = request.getfixturevalue(f"{point}_spectrum")
    r = LF.hessian_eigenvalues(model, cross_entropy, batches, k=1)
    assert r.converged
    assert r.num_hvps <= 12
    assert abs(r.eigenvalues[0] - exact[0]) / exact[0] <= 1e-3


def test_warm_start_after_steps(data, trained):
    x, y, batches = data
    model = copy.deepcopy(trained)
    first = LF.hessian_eigenvalues(model, cross_entropy, batches, k=1)
    _train(model, x, y, 5)
    _, exact = _spectrum(model, batches)
    warm = LF.hessian_eigenvalues(model, cross_entropy, batches, k=1, init=first.eigenvectors)
    assert warm.num_hvps <= 5
    assert abs(warm.eigenvalues[0] - exact[0]) / exact[0] <= 1e-3
    cold = LF.hessian_eigenvalues(model, cross_entropy, batches, k=1)
    assert warm.num_hvps < cold.num_hvps


def test_top3(data, trained, trained_spectrum):
    _, _, batches = data
    _, exact = trained_spectrum
    r = LF.hessian_eigenvalues(trained, cross_entropy, batches, k=3)
    assert r.num_hvps <= 30
    rel = (r.eigenvalues - exact[:3]).abs() / exact[:3]
    assert (rel <= 1e-2).all(), rel
    assert torch.all(r.eigenvalues[:-1] >= r.eigenvalues[1:])  # largest first
    gram = r.eigenvectors @ r.eigenvectors.T
    torch.testing.assert_close(gram, torch.eye(3), atol=1e-4, rtol=0)


def test_eigenvectors_are_eigenvectors(data, trained, trained_spectrum):
    _, _, batches = data
    h, _ = trained_spectrum
    r = LF.hessian_eigenvalues(trained, cross_entropy, batches, k=2, tol=1e-6)
    v = r.eigenvectors.double()
    residual = (v @ h - r.eigenvalues[:, None] * v).norm(dim=1) / r.eigenvalues.abs()
    assert (residual < 1e-2).all()


def test_trace_default_budget(data, trained, trained_spectrum):
    _, _, batches = data
    h, _ = trained_spectrum
    t = LF.hessian_trace(trained, cross_entropy, batches)
    assert t.num_hvps <= 100
    exact = h.trace().item()
    assert abs(t.estimate - exact) / exact <= 0.05
    assert abs(t.estimate - exact) <= 4 * t.stderr + 1e-6


def test_trace_at_init_within_its_stderr(data, init_model, init_spectrum):
    # at initialization the Hessian is strongly indefinite (negative mass ~5x the trace): no
    # stochastic estimator gets a small relative error cheaply, but the reported stderr is honest
    _, _, batches = data
    model = init_model
    h, _ = init_spectrum
    for method in ("hutch++", "hutchinson"):
        t = LF.hessian_trace(model, cross_entropy, batches, method=method)
        assert abs(t.estimate - h.trace().item()) <= 4 * t.stderr


def test_hutchinson_on_diagonal_is_exact():
    a = torch.diag(torch.linspace(-1.0, 3.0, 50))
    t = LF.trace_estimate(LF.DenseOperator(a), 7, method="hutchinson")
    assert t.estimate == pytest.approx(a.trace().item(), rel=1e-5)


def test_density_matches_spectrum(data, trained, trained_spectrum):
    _, _, batches = data
    _, exact = trained_spectrum
    d = LF.hessian_density(trained, cross_entropy, batches, num_probes=4, num_steps=40)
    dx = float(d.grid[1] - d.grid[0])
    assert float(d.density.sum()) * dx == pytest.approx(1.0, abs=1e-3)
    # the quadrature's extreme nodes converge to the extreme eigenvalues
    assert float(d.nodes.nan_to_num(-1e9).max()) == pytest.approx(exact[0].item(), rel=1e-3)
    assert float(d.nodes.nan_to_num(1e9).min()) == pytest.approx(exact[-1].item(), abs=0.05 * exact[0].item())
    # the mean of the density is tr(H)/n (each probe's weights give an unbiased first moment)
    mean = float((d.grid * d.density).sum() * dx)
    assert mean == pytest.approx(exact.mean().item(), abs=0.02 * exact[0].item())
    assert d.num_hvps == 4 * 40 + 1  # and the one product `auto` spends choosing the method


def test_hvp_matches_dense(data, trained, trained_spectrum):
    _, _, batches = data
    h, _ = trained_spectrum
    v = torch.randn(3, h.shape[0], generator=torch.Generator().manual_seed(1))
    expected = v.double() @ h
    for method in ("double_backward", "double_backward_batched", "forward_over_reverse", "finite_difference"):
        got = LF.hvp(trained, cross_entropy, batches, v, hvp_method=method).double()
        err = (got - expected).norm() / expected.norm()
        # central differences in float32: truncation O(h²) plus rounding O(eps/h) at h ~ eps^(1/3)
        assert err < (1e-3 if method == "finite_difference" else 1e-5), (method, err)


def test_parameter_subset(data, trained, trained_spectrum):
    _, _, batches = data
    h, _ = trained_spectrum
    n_first = 64 * 24 + 24
    block = h[n_first:, n_first:]  # the last layer's block
    r = LF.hessian_eigenvalues(trained, cross_entropy, batches, params=["2.weight", "2.bias"], k=1)
    assert r.eigenvectors.shape[1] == block.shape[0]
    assert r.eigenvalues[0].item() == pytest.approx(torch.linalg.eigvalsh(block)[-1].item(), rel=1e-3)


def test_generator_controls_randomness(data, trained):
    _, _, batches = data
    state = torch.random.get_rng_state()
    a = LF.hessian_trace(trained, cross_entropy, batches, num_hvps=9, generator=torch.Generator().manual_seed(3))
    b = LF.hessian_trace(trained, cross_entropy, batches, num_hvps=9, generator=torch.Generator().manual_seed(3))
    c = LF.hessian_trace(trained, cross_entropy, batches, num_hvps=9, generator=torch.Generator().manual_seed(4))
    assert a.estimate == b.estimate != c.estimate
    assert torch.equal(state, torch.random.get_rng_state())
