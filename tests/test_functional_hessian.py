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
from torch import nn

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


# --- repeated and near-repeated eigenvalues, warm-start traps, product counts ------------------------------------


def _rotated(values: list[float], n: int = 200, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """``(Q diag(values, rest) Qᵀ, Q)`` with ``rest`` uniform in (0, 0.9) and ``Q`` a random rotation (seed 0)."""
    g = torch.Generator().manual_seed(0)
    rest = torch.rand(n - len(values), generator=g, dtype=torch.float64) * 0.9
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q @ torch.diag(torch.cat([torch.tensor(values, dtype=torch.float64), rest])) @ q.T).to(dtype), q


def _rel_error(result: LF.EigenResult, exact: torch.Tensor) -> float:
    k = result.eigenvalues.numel()
    return float(((result.eigenvalues.double() - exact[:k]).abs() / exact[:k].abs()).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [3, 4])
def test_top_k_finds_a_triple_eigenvalue(k, dtype):
    # single-start Lanczos sees one copy of a repeated eigenvalue: it returned [2, 2, 0.99997] / [2, 2, 1, 0.9]
    expected = torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)[:k]
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        r = LF.top_eigenvalues(LF.DenseOperator(_rotated([2, 2, 2, 1], dtype=dtype)[0]), k, max_hvps=300, generator=g)
        assert r.converged
        assert _rel_error(r, expected) <= 1e-3, (seed, r.eigenvalues)


def _zero_head_hessian(classes: int, bias: bool) -> tuple[nn.Module, list, torch.Tensor]:
    x, y = digits(256)
    x, y = x[y < classes].double(), y[y < classes]
    head = nn.Linear(64, classes, bias=bias).double()
    nn.init.zeros_(head.weight)
    if bias:
        nn.init.zeros_(head.bias)
    batches = [(x, y)]
    return head, batches, dense_hessian(head, cross_entropy, batches)


@pytest.mark.parametrize(("classes", "bias"), [(3, False), (3, True), (5, False)])
def test_zero_initialised_head_has_a_repeated_top_eigenvalue(classes, bias):
    # a zero head predicts 1/C for every class: H = (I/C - 11ᵀ/C²) ⊗ E[xxᵀ], every eigenvalue of E[xxᵀ]/C repeated
    # C - 1 times. In float64 single-start Lanczos returned [λ1, λ3, λ4] for C = 3 with converged=True. For C = 5
    # (top-5 = [λ1 ×4, λ5]) the block of 3 finds 3 copies and must restart with a block of 5.
    head, batches, h = _zero_head_hessian(classes, bias)
    exact = torch.linalg.eigvalsh(h).flip(0)
    copies = classes - 1
    assert exact[0] - exact[copies - 1] <= 1e-10 * exact[0] and exact[copies - 1] > 2 * exact[copies]  # repeated
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        r = LF.hessian_eigenvalues(head, cross_entropy, batches, k=classes, generator=g)
        assert r.converged and _rel_error(r, exact) <= 1e-3, (seed, r.eigenvalues, exact[:classes])
        g = torch.Generator().manual_seed(seed)
        dense = LF.top_eigenvalues(LF.DenseOperator(h), classes, generator=g)
        assert dense.converged and _rel_error(dense, exact) <= 1e-3, (seed, dense.eigenvalues, exact[:classes])


@pytest.mark.parametrize("k", [5, 6])
def test_a_cluster_larger_than_the_block_is_found(k):
    # five copies of 2: the block of 3 sees three, suspects more (three equal values before position k) and restarts
    # with a block of k
    h, _ = _rotated([2, 2, 2, 2, 2, 1], dtype=torch.float32)
    expected = torch.tensor([2.0] * 5 + [1.0], dtype=torch.float64)
    for seed in range(3):
        r = LF.top_eigenvalues(LF.DenseOperator(h), k, max_hvps=300, generator=torch.Generator().manual_seed(seed))
        assert r.converged and _rel_error(r, expected) <= 1e-3, (seed, r.eigenvalues)
        assert r.num_hvps <= 300


def test_converged_only_when_the_multiplicity_is_found():
    h, _ = _rotated([2, 2, 2, 1], dtype=torch.float32)
    exact = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    # one block of products cannot resolve anything: converged must be False
    r = LF.top_eigenvalues(LF.DenseOperator(h), 3, max_hvps=3, generator=torch.Generator().manual_seed(0))
    assert not r.converged
    seen_converged = 0
    for max_hvps in (3, 6, 10, 12, 17, 20, 24, 31, 40, 60):  # some end on a part block
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            r = LF.top_eigenvalues(LF.DenseOperator(h), 3, max_hvps=max_hvps, generator=g)
            assert r.num_hvps <= max_hvps
            if r.converged:
                seen_converged += 1
                assert _rel_error(r, exact) <= 1e-3, (max_hvps, seed, r.eigenvalues)
    assert seen_converged >= 8  # the large budgets do converge


def _block_run_checks(h: torch.Tensor, run) -> None:
    """``T = basis H basisᵀ``, an orthonormal basis, and ``‖residual @ s‖ = ‖H x - θ x‖`` for every Ritz pair."""
    q = run.basis.double()
    torch.testing.assert_close(q @ q.T, torch.eye(q.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(run.tridiagonal, q @ h @ q.T, atol=1e-10, rtol=0)
    theta, s = torch.linalg.eigh(run.tridiagonal)
    x = s.T @ q
    true = (x @ h - theta[:, None] * x).norm(dim=1)
    torch.testing.assert_close((run.residual @ s).norm(dim=0), true, atol=1e-10, rtol=0)


def test_block_lanczos_deflates_and_keeps_its_relations():
    from lightning_landscape.functional._lanczos import block_lanczos

    g = torch.Generator().manual_seed(0)
    # three distinct eigenvalues, four copies each: a block of 3 spans the reachable 9 dimensions in 3 steps, then
    # its residual block vanishes (deflation) and fresh random directions reach the remaining copies
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    h = q @ torch.diag(torch.tensor([3.0] * 4 + [2.0] * 4 + [1.0] * 4, dtype=torch.float64)) @ q.T
    run = block_lanczos(lambda v: v @ h, torch.randn(3, 12, generator=g, dtype=torch.float64), 12, generator=g)
    assert run.num_matvecs == 12 and run.num_fresh >= 3
    torch.testing.assert_close(torch.linalg.eigvalsh(run.tridiagonal), torch.linalg.eigvalsh(h), atol=1e-10, rtol=0)
    _block_run_checks(h, run)
    # a rank-deficient start block (a repeated row) and a budget that ends on part of a block (3 + 3 + 3 + 1)
    h, _ = _rotated([2, 2, 2, 1])
    start = torch.randn(3, 200, generator=g, dtype=torch.float64)
    start[1] = start[0]
    run = block_lanczos(lambda v: v @ h, start, 10, generator=g)
    assert run.num_matvecs == 10 and run.num_fresh == 1
    _block_run_checks(h, run)


@pytest.mark.parametrize("rank", [40, 3, 1])
def test_single_vector_lanczos_is_the_block_steps_to_rounding(rank):
    # block_lanczos with one start vector takes its scalar path: the same tridiagonal, basis, residual, fresh
    # directions (rank 3 and 1: invariant subspaces, then random directions from the same generator) and stop
    from lightning_landscape.functional._lanczos import _block_steps, block_lanczos
    from lightning_landscape.functional._space import EUCLIDEAN

    g = torch.Generator().manual_seed(rank)
    a = torch.randn(40, rank, generator=g, dtype=torch.float64)
    h = a @ a.T
    start = torch.randn(1, 40, generator=g, dtype=torch.float64)
    stops = []

    def stop(t, residual):  # stop once the top Ritz value settles: exercises the stop rule's arguments
        stops.append((t.clone(), residual.clone()))
        return len(stops) >= 3 and residual.shape[0] > 0 and float(residual.norm()) < 1e-8

    one = block_lanczos(lambda v: v @ h, start, 12, stop=stop, generator=torch.Generator().manual_seed(99))
    seen, stops[:] = list(stops), []
    ref = _block_steps(lambda v: v @ h, start, 12, stop, torch.Generator().manual_seed(99), 100.0, EUCLIDEAN)
    assert (one.num_matvecs, one.num_fresh) == (ref.num_matvecs, ref.num_fresh)
    torch.testing.assert_close(one.tridiagonal, ref.tridiagonal, atol=1e-12, rtol=0)
    torch.testing.assert_close(one.basis, ref.basis, atol=1e-12, rtol=0)
    torch.testing.assert_close(one.residual, ref.residual, atol=1e-12, rtol=0)
    for (t1, r1), (t2, r2) in zip(seen, stops, strict=True):
        torch.testing.assert_close(t1, t2, atol=1e-12, rtol=0)
        torch.testing.assert_close(r1, r2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_converged_means_correct_on_a_near_degenerate_pair(trained_spectrum, k):
    # the trained MLP's λ2, λ3 are close: single-start Lanczos once stopped on [λ1, λ3] (11% off) saying converged
    h, exact = trained_spectrum
    for seed in range(12):
        r = LF.top_eigenvalues(LF.DenseOperator(h.float()), k, tol=1e-3, generator=torch.Generator().manual_seed(seed))
        assert r.converged
        assert _rel_error(r, exact) <= 1e-3, (seed, r.eigenvalues, exact[:k])


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warm_start_from_the_wrong_eigenvectors_still_finds_the_top(k, dtype):
    # the last measurement's eigenvectors are exactly v2..v(k+1): a new direction has become the top one, orthogonal to
    # all of them. A start built from init alone spans an invariant subspace and "converges" to λ2..λ(k+1).
    values = [3.0, 2.0, 1.5, 1.2, 1.1]
    h, q = _rotated(values, dtype=dtype)
    init = q[:, 1 : k + 1].T.to(dtype)  # eigenvectors of 2.0, 1.5, ...
    for seed in range(3):
        r = LF.top_eigenvalues(LF.DenseOperator(h), k, init=init, generator=torch.Generator().manual_seed(seed))
        assert r.converged
        assert _rel_error(r, torch.tensor(values, dtype=torch.float64)) <= 1e-3, (seed, r.eigenvalues)


@pytest.fixture(scope="module")
def benchmark_mlp_hessian():
    """The matrix of ``benchmarks/eigen_counts.py``'s ``mlp`` rows (100 SGD steps, Hessian on 256 samples)."""
    x, y = digits(512)
    model = digits_mlp()
    _train(model, x, y, 100)
    return dense_hessian(model, cross_entropy, [(x[:256], y[:256])])


# `python benchmarks/eigen_counts.py` before block Lanczos (single-start Lanczos), HVPs over seeds 0-4:
# mlp k=1 median 8, max 9; k=3 median 15, max 15; k=5 median 16, max 16. The bound is 1.5x those, rounded down.
HVP_BOUNDS = {1: (12, 13), 3: (22, 22), 5: (24, 24)}


@pytest.mark.parametrize("k", sorted(HVP_BOUNDS))
def test_hvp_counts_on_a_non_degenerate_spectrum(benchmark_mlp_hessian, k):
    exact = torch.linalg.eigvalsh(benchmark_mlp_hessian).flip(0)
    counts = []
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        r = LF.top_eigenvalues(LF.DenseOperator(benchmark_mlp_hessian.float()), k, tol=1e-3, max_hvps=300, generator=g)
        assert r.converged and _rel_error(r, exact) <= 1e-3
        counts.append(r.num_hvps)
    median, most = sorted(counts)[2], max(counts)
    assert median <= HVP_BOUNDS[k][0] and most <= HVP_BOUNDS[k][1], counts
