"""Sharpness against closed forms on linear least squares at its exact minimum, and its invariances.

With ``L(w) = ½·mean((Xw − y)²)`` the Hessian is ``A = XᵀX/n`` everywhere and at the minimum
``L(w* + δ) − L(w*) = ½ δᵀAδ`` exactly, so (``C = diag(c)``):

- worst case, ℓ2: ``max over ‖δ/c‖₂ ≤ ρ`` is ``½ρ²·λ_max(CAC)``;
- worst case, ℓ∞, ``A`` diagonal: every vertex of the box is a maximizer, ``½ρ²·Σ a_i c_i²``;
- average case: ``½·E[zᵀCACz]`` is ``½(ρ²/d)·tr(CAC)`` (ℓ2) and ``½(ρ²/3)·tr(CAC)`` (ℓ∞);
- keskar (``A`` diagonal): ``100·½ρ²·Σ a_i (|w_i| + 1)² / (1 + L(w*))``.

Models are float64 so that the minimum is exact; its gradient is then rounding noise (or exactly
zero), so the Krylov space starts from an effectively random direction (and a random one mixed in).
Tolerances:

- worst case ℓ2, 3% (the issue's). A Krylov space of ~20 secants needs the top eigenvalue to stand out
  of the spectrum's width, as Hessians of trained networks have it (outliers above a bulk); the design
  here has λ₂/λ₁ ≈ 0.45 (0.25 for the adaptive CAC).
- average case: the estimate's relative standard deviation is ``sqrt(2·tr(M²))/tr(M)/sqrt(samples)``
  for ``M = CAC`` (``½zᵀMz`` per draw, ``z`` Gaussian): 4.0% here for the plain ℓ2 case at 20 draws
  (measured over 100 seeds: 4.1%), so the issue's 15% is more than three standard deviations; the
  adaptive case (effective rank 15: 9% at 20 draws) takes 100 draws and is held to four of its
  standard deviations, computed the same way (3.6%).
- vertices of a box (ℓ∞ on a diagonal ``A``, keskar): exact up to the float32 rounding of the
  operator's loss, so 1e-5.

The last section measures at saddles: quadratics with negative eigenvalues down to λ_min, with and without a
gradient, against the exact trust-region solution (ℓ2) and the box's exact maximum (ℓ∞), and the limits.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from _models import digits
from _quadratics import Quadratic, box_max_brute_force, box_max_diagonal, quadratic_loss, saddle, trust_region_max
from _state import assert_same, snapshot
from torch import nn

from lightning_landscape.functional.hvp import LossOperator
from lightning_landscape.functional.sharpness import SharpnessResult, sharpness, sharpness_estimate

RHO = 0.05


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).mean()


def _linear(w: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    model = nn.Linear(w.numel(), 1, bias=bias is not None).double()
    with torch.no_grad():
        model.weight.copy_(w.reshape(1, -1))
        if bias is not None:
            model.bias.copy_(bias.reshape(1))
    return model


def _batches(x, y):
    # two uneven batches: the loss is their sample-weighted mean, i.e. the mean over all rows
    return [(x[:300], y[:300]), (x[300:], y[300:])]


@pytest.fixture(scope="module")
def spiked():
    """n=400, d=100 Gaussian design, column scales 2.0, 1.3 then 0.4..1.0 (one outlier eigenvalue), noisy
    targets; w* by lstsq in float64. w*₀ ≈ 2 makes the adaptive CAC's top eigenvalue an outlier too."""
    g = torch.Generator().manual_seed(0)
    n, d = 400, 100
    scales = torch.cat([torch.tensor([2.0, 1.3]), torch.linspace(0.4, 1.0, d - 2)]).double()
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    w_true = torch.randn(d, 1, generator=g, dtype=torch.float64)
    w_true[0] = 2.0
    y = x @ w_true + 0.1 * torch.randn(n, 1, generator=g).double()
    w = torch.linalg.lstsq(x, y).solution.reshape(-1)
    return x, y, w, x.T @ x / n


@pytest.fixture(scope="module")
def diagonal():
    """Rows are scaled unit vectors (four per column), so A = XᵀX/n is diagonal; y noisy, so L(w*) > 0."""
    g = torch.Generator().manual_seed(1)
    d = 40
    s = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    x = torch.diag(s).repeat(4, 1)  # [160, 40]
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = (x @ w_true).reshape(-1, 1) + 0.1 * torch.randn(4 * d, 1, generator=g).double()
    w = torch.linalg.lstsq(x, y).solution.reshape(-1)
    a = torch.diagonal(x.T @ x / x.shape[0])
    return x, y, w, a


def _top(a: torch.Tensor) -> float:
    return torch.linalg.eigvalsh(a)[-1].item()


# ---------------------------------------------------------------------------------------------- closed forms
def test_worst_case_l2_is_half_rho2_lambda_max(spiked):
    x, y, w, a = spiked
    model = _linear(w)
    value = sharpness(model, mse, _batches(x, y), RHO)
    assert value == pytest.approx(0.5 * RHO**2 * _top(a), rel=0.03)
    # never above the maximum (a maximum over the ball, up to rounding)
    assert value <= 0.5 * RHO**2 * _top(a) * (1 + 1e-6)


def test_worst_case_l2_from_an_exactly_zero_gradient():
    """Integer data with an exact fit: the gradient at w* is exactly zero, SAM's ε is zero, and the
    ascent must start from a random direction (the generator's) instead of stopping at 0."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (400, 30), generator=g).double()
    x[:, 0] *= 3
    w = torch.randint(-3, 4, (30,), generator=g).double()
    y = (x @ w).reshape(-1, 1)
    model = _linear(w)
    with LossOperator(model, mse, [(x, y)]) as op:
        loss, grad = op.gradient()
    assert loss.item() == 0.0 and bool((grad == 0).all())
    a = x.T @ x / 400
    for seed in (0, 1):
        value = sharpness(model, mse, [(x, y)], RHO, generator=torch.Generator().manual_seed(seed))
        assert value == pytest.approx(0.5 * RHO**2 * _top(a), rel=0.03)


def test_average_case_l2_is_half_rho2_over_d_trace(spiked):
    x, y, w, a = spiked
    model = _linear(w)
    value = sharpness(model, mse, _batches(x, y), RHO, kind="average_case")
    assert (2 * a.pow(2).sum()).sqrt().item() / a.trace().item() / 20**0.5 < 0.05  # the estimator's rel. std
    assert value == pytest.approx(0.5 * RHO**2 / a.shape[0] * a.trace().item(), rel=0.15)


def test_average_case_linf_is_half_rho2_over_3_trace(spiked):
    x, y, w, a = spiked
    value = sharpness(_linear(w), mse, _batches(x, y), RHO, kind="average_case", norm="linf")
    assert value == pytest.approx(0.5 * RHO**2 / 3 * a.trace().item(), rel=0.15)


def test_adaptive_closed_forms(spiked):
    """c = |w*| + η: worst case ½ρ²·λ_max(CAC), average case ½(ρ²/d)·tr(CAC)."""
    x, y, w, a = spiked
    model = _linear(w)
    eta = 0.2
    c = w.abs() + eta
    cac = c[:, None] * a * c[None, :]
    worst = sharpness(model, mse, _batches(x, y), RHO, adaptive=True, eta=eta)
    assert worst == pytest.approx(0.5 * RHO**2 * _top(cac), rel=0.03)
    # CAC has a lower effective rank (15): 100 draws make the estimate's relative std 3.6%
    average = sharpness(model, mse, _batches(x, y), RHO, kind="average_case", adaptive=True, eta=eta, samples=100)
    rel_std = (2 * cac.pow(2).sum()).sqrt().item() / cac.trace().item() / 100**0.5
    assert rel_std < 0.04
    assert average == pytest.approx(0.5 * RHO**2 / a.shape[0] * cac.trace().item(), rel=4 * rel_std)
    # and it is a different number from the plain one
    assert abs(worst - sharpness(model, mse, _batches(x, y), RHO)) / worst > 0.1


def test_worst_case_linf_on_diagonal_hessian(diagonal):
    x, y, w, a = diagonal
    value = sharpness(_linear(w), mse, [(x, y)], RHO, norm="linf")
    assert value == pytest.approx(0.5 * RHO**2 * a.sum().item(), rel=1e-5)


def test_worst_case_linf_from_an_exactly_zero_gradient():
    """sign(0) = 0 would leave every coordinate at 0: zero entries take a random sign instead."""
    s = torch.tensor([0.5, 1.0, 1.5, 2.0]).double().repeat(5)  # dyadic: X w is exact
    x = torch.diag(s).repeat(3, 1)
    w = torch.arange(-10.0, 10.0).double()
    y = (x @ w).reshape(-1, 1)
    a = torch.diagonal(x.T @ x / x.shape[0])
    value = sharpness(_linear(w), mse, [(x, y)], RHO, norm="linf")
    assert value == pytest.approx(0.5 * RHO**2 * a.sum().item(), rel=1e-5)


def test_keskar_closed_form(diagonal):
    x, y, w, a = diagonal
    model = _linear(w)
    base = mse(model, (x, y)).item()
    assert base > 1e-3  # the 1 + L(w) denominator is exercised
    expected = 100 * 0.5 * RHO**2 * (a * (w.abs() + 1) ** 2).sum().item() / (1 + base)
    assert sharpness(model, mse, [(x, y)], RHO, kind="keskar") == pytest.approx(expected, rel=1e-5)
    # keskar's box is |w| + 1 whatever eta says
    assert sharpness(model, mse, [(x, y)], RHO, kind="keskar", eta=0.5) == pytest.approx(expected, rel=1e-5)


def test_parameter_subset(spiked):
    """With a bias, at the minimum over both; measuring the weight only uses the weight block of A."""
    x, y, _, a = spiked
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    sol = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution.reshape(-1)
    model = _linear(sol[:-1], sol[-1])
    value = sharpness(model, mse, _batches(x, y), RHO, params=["weight"])
    assert value == pytest.approx(0.5 * RHO**2 * _top(a), rel=0.03)


def test_never_negative_at_a_maximum():
    """At the top of a concave loss every perturbation lowers it: worst case 0, average case < 0."""
    model = _linear(torch.zeros(10, dtype=torch.float64))

    def concave(m, batch):
        return -0.5 * m.weight.pow(2).sum() + 0.0 * m(batch).sum()

    x = torch.ones(4, 10, dtype=torch.float64)
    for norm in ("l2", "linf"):
        assert sharpness(model, concave, [x], RHO, norm=norm) == 0.0
    average = sharpness(model, concave, [x], RHO, kind="average_case")
    assert average == pytest.approx(-0.5 * RHO**2, rel=0.5)  # −½E‖z‖², 20 draws of a χ²₁₀/10


# ---------------------------------------------------------------------------------------------- invariance
def _relu_net(alpha: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    with torch.no_grad():  # relu(α·(W₁x + b₁)) = α·relu(W₁x + b₁), undone by W₂/α: the same function
        net[0].weight.mul_(alpha)
        net[0].bias.mul_(alpha)
        net[2].weight.div_(alpha)
    return net


def _ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize(
    "measure",
    [dict(kind="worst_case", norm="l2"), dict(kind="worst_case", norm="linf"), dict(kind="average_case", norm="l2")],
    ids=["worst_l2", "worst_linf", "average_l2"],
)
def test_adaptive_is_invariant_to_relu_rescaling_and_plain_is_not(measure):
    x, y = digits(128)
    batches = [(x.double(), y)]
    net, scaled = _relu_net(), _relu_net(alpha=4.0)
    torch.testing.assert_close(net(batches[0][0]), scaled(batches[0][0]), rtol=1e-12, atol=1e-12)
    # radii where each measure is well above float64 rounding (c = |w| ~ 0.1 makes adaptive steps small)
    rho = {"worst_case_l2": 0.1, "worst_case_linf": 0.01, "average_case_l2": 2.0}[
        f"{measure['kind']}_{measure['norm']}"
    ]

    def run(model, adaptive):
        gen = torch.Generator().manual_seed(5)
        return sharpness(model, _ce, batches, rho, adaptive=adaptive, eta=0.0, steps=10, generator=gen, **measure)

    adaptive = run(net, True)
    assert adaptive > 0
    # c = |w| maps the constraint set, the ascent steps and the random draws exactly onto each other;
    # float64 rounding (and a near-tie in the step-size rule) leaves ~1e-9 relative differences
    assert run(scaled, True) == pytest.approx(adaptive, rel=1e-6)
    plain, plain_scaled = run(net, False), run(scaled, False)
    assert abs(plain - plain_scaled) / plain > 0.1


# ---------------------------------------------------------------------------------------------- nothing lost
def _bn_dropout_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    net[0].bias.requires_grad_(False)  # a frozen parameter stays frozen (and is not measured)
    return net


@pytest.mark.parametrize("eval_mode", [True, False])
def test_state_is_untouched(eval_mode):
    x, y = digits(128)
    model = _bn_dropout_net()
    model.train()
    _ce(model, (x, y)).backward()  # .grad populated, as mid-training
    model[4].eval()  # a mixed mode tree must come back as it was
    before = snapshot(model)
    results = [
        sharpness(
            model, _ce, [(x, y)], kind=kind, norm=norm, adaptive=adaptive, steps=3, samples=2, eval_mode=eval_mode
        )
        for kind, norm, adaptive in [
            ("worst_case", "l2", False),
            ("worst_case", "linf", True),
            ("average_case", "l2", True),
            ("average_case", "linf", False),
            ("keskar", None, False),
        ]
    ]
    after = snapshot(model)
    assert all(r >= 0 for r in results[:2]) and results[4] >= 0
    assert_same(before, after)


def test_randomness_comes_from_the_generator(spiked):
    x, y, w, _ = spiked
    model = _linear(w)

    def average(seed):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return sharpness(model, mse, _batches(x, y), RHO, kind="average_case", samples=3, generator=gen)

    torch.manual_seed(123)
    first = average(3)
    torch.manual_seed(456)  # the global RNG plays no part
    assert average(3) == first
    assert average(4) != first
    assert average(None) == average(0)  # no generator: a fresh one seeded with 0


# ---------------------------------------------------------------------------------------------- operator level
def test_operator_level_matches_and_reports(spiked):
    x, y, w, _ = spiked
    model = _linear(w)
    with LossOperator(model, mse, _batches(x, y)) as op:
        worst = sharpness_estimate(op, RHO, kind="worst_case", steps=7)
        average = sharpness_estimate(op, RHO, kind="average_case", samples=5, generator=torch.Generator())
    assert isinstance(worst, SharpnessResult)
    assert worst.tag == "worst_case_l2" and average.tag == "average_case_l2"
    assert (worst.num_gradients, worst.num_losses) == (7, 1)
    assert (average.num_gradients, average.num_losses) == (0, 11)
    base = mse(model, (x, y)).item()
    assert worst.loss == pytest.approx(base, rel=1e-6) and average.loss == pytest.approx(base, rel=1e-6)
    assert worst.value == pytest.approx(worst.perturbed_loss - worst.loss, abs=1e-12)
    assert worst.value == sharpness(model, mse, _batches(x, y), RHO, steps=7)
    assert average.value == sharpness(
        model, mse, _batches(x, y), RHO, kind="average_case", samples=5, generator=torch.Generator()
    )
    with LossOperator(model, mse, _batches(x, y)) as op:
        keskar = sharpness_estimate(op, RHO, kind="keskar", steps=2)
    assert keskar.tag == "keskar_linf" and not keskar.adaptive


def test_more_steps_never_lower_the_worst_case(spiked):
    """The step-size rule keeps the best point: the value is non-decreasing in ``steps``."""
    x, y, w, _ = spiked
    model = copy.deepcopy(_linear(w))
    with torch.no_grad():
        model.weight.add_(0.05)  # off the minimum: the gradient term matters too
    values = [sharpness(model, mse, _batches(x, y), 0.5, steps=s) for s in (1, 2, 5, 10, 20)]
    assert values == sorted(values)
    assert values[0] > 0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(rho=0.0), "rho"),
        (dict(rho=-0.1), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(rho="big"), "rho"),
        (dict(kind="sharpest"), "kind"),
        (dict(norm="l1"), "norm"),
        (dict(kind="keskar", norm="l2"), "norm"),
        (dict(kind="keskar", adaptive=True), "adaptive"),
        (dict(adaptive="yes"), "adaptive"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(samples=0), "samples"),
        (dict(eta=-0.01), "eta"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    model = _linear(torch.zeros(3, dtype=torch.float64))
    batch = (torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=name) as info:
        sharpness(model, mse, [batch], **kwargs)
    if name in ("kind", "norm") and "keskar" not in str(kwargs):
        assert "worst_case" in str(info.value) or "linf" in str(info.value)  # the accepted values are listed


# ---------------------------------------------------------------------------------------------- saddles
# Quadratics ``L(θ) = gᵀ(θ − w) + ½(θ − w)ᵀA(θ − w)`` measured at ``θ = w``, with ``λ_max(A) = 1`` and negative
# eigenvalues down to ``λ_min``. In the ``u = δ / c`` coordinates the worst case is ``max gᵀCu + ½uᵀCACu`` over
# the ball (box), ``C = diag(c)``: the references below solve exactly that, densely, in float64.
def measure_quadratic(a, g, w, rho, dtype=torch.float64, steps=20, seed=0, **kwargs):
    """``(result, w as measured in float64, [gradients, losses] counted on the operator)``."""
    model = Quadratic(a, g, w).to(dtype)
    counts = [0, 0]
    with LossOperator(model, quadratic_loss, [torch.zeros(1)]) as op:
        gradient, loss = op.gradient, op.loss

        def counted_gradient(*args):
            counts[0] += 1
            return gradient(*args)

        def counted_loss(*args):
            counts[1] += 1
            return loss(*args)

        op.gradient, op.loss = counted_gradient, counted_loss
        result = sharpness_estimate(op, rho, steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)
    return result, model.theta.detach().double(), counts


def exact_worst_case(a, g, w, rho, norm, adaptive, eta=0.1, diagonal=False) -> float:
    c = (w.abs() + eta) if adaptive else torch.ones_like(w)
    a_u, g_u = c[:, None] * a * c[None, :], c * g
    if norm == "l2":
        return trust_region_max(a_u, g_u, rho)
    return box_max_diagonal(torch.diagonal(a_u), g_u, rho) if diagonal else box_max_brute_force(a_u, g_u, rho)


def test_references_agree():
    """The dense trust-region solution against a fine sampling of the disk in 2D (the easy case, the hard case
    and a concave one with an interior maximum), and the box's closed form against its brute force."""
    angles = torch.linspace(0, 2 * torch.pi, 4001, dtype=torch.float64)
    radii = torch.linspace(0, 0.05, 201, dtype=torch.float64)
    disk = (radii[:, None, None] * torch.stack([angles.cos(), angles.sin()], 1)).reshape(-1, 2)
    for lam, g in [
        ((1.0, -4.0), (0.0, 0.0)),
        ((1.0, -4.0), (0.0, 0.02)),
        ((1.0, -4.0), (0.03, 0.1)),
        ((-1.0, -2.0), (0.01, 0.0)),
    ]:
        a, g = torch.diag(torch.tensor(lam, dtype=torch.float64)), torch.tensor(g, dtype=torch.float64)
        sampled = (disk @ g + 0.5 * ((disk @ a) * disk).sum(1)).max().item()
        assert trust_region_max(a, g, 0.05) == pytest.approx(sampled, rel=1e-5)
    a, g, _ = saddle(8, -4.0, "small", 0.05, 0, diagonal=True)
    assert box_max_diagonal(torch.diagonal(a), g, 0.05) == pytest.approx(box_max_brute_force(a, g, 0.05), rel=1e-12)


GRADIENTS = ("none", "small", "large", "orthogonal")
SADDLE_CASES = [(torch.float32, 10, 0.05), (torch.float64, 60, 0.3), (torch.float32, 200, 0.05)]  # dtype, d, ρ


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_worst_case_at_a_saddle_matches_the_exact_maximum(norm, adaptive, one_thread):
    """The issue: on a quadratic with a saddle at the weights the ℓ2 ascent found 1.234e-3 / 1.50e-4 for
    ½ρ²λ_max = 1.25e-3 (λ_min = −4 / −50), running to the largest |λ|. Now within 5% (the issue's bound) of
    the exact maximum for every mix of signs, with and without a gradient, in float32 and float64, d from 10 to
    200, two radii; ℓ∞ on diagonal Hessians (closed form; any spectrum), ℓ2 on rotated ones (the trust-region
    solution; outliers and a bulk, as Hessians have: for evenly spread spectra see the next test); never above
    the maximum (every value is a loss at a feasible point)."""
    failures = []
    spectra = ("outliers", "uniform") if norm == "linf" else ("outliers",)
    for lam_min, gradient, spectrum in itertools.product((-0.5, -4.0, -50.0), GRADIENTS, spectra):
        for dtype, d, rho in SADDLE_CASES:
            a, g, w = saddle(d, lam_min, gradient, rho, seed=d, diagonal=norm == "linf", spectrum=spectrum)
            result, w_measured, _ = measure_quadratic(a, g, w, rho, dtype, norm=norm, adaptive=adaptive, eta=0.1)
            exact = exact_worst_case(a, g, w_measured, rho, norm, adaptive, diagonal=norm == "linf")
            error = (exact - result.value) / exact
            if not (-1e-9 if dtype == torch.float64 else -1e-5) <= error <= 0.05:
                case = f"{spectrum} λ_min={lam_min} g={gradient} {dtype} d={d} ρ={rho}"
                failures.append(f"{case}: {result.value:.5g} vs {exact:.5g}")
    assert not failures, "\n".join(failures)


def test_worst_case_l2_at_the_issues_saddle(one_thread):
    """The issue's numbers: λ_max = 1, λ_min = −4 and −50, ρ = 0.05, no gradient: ½ρ²λ_max = 1.25e-3."""
    for lam_min in (-4.0, -50.0):
        a, g, w = saddle(100, lam_min, "none", 0.05, seed=3)
        for dtype in (torch.float32, torch.float64):
            result, _, _ = measure_quadratic(a, g, w, 0.05, dtype)
            assert result.value == pytest.approx(1.25e-3, rel=0.05)


def test_keskar_at_a_saddle_matches_the_closed_form(one_thread):
    """Keskar's box ``|δᵢ| ≤ ρ(|wᵢ| + 1)`` on a diagonal saddle: ``100·max/(1 + L(w))`` with L(w) = 0."""
    for lam_min in (-0.5, -4.0, -50.0):
        for gradient in ("none", "small", "large"):
            a, g, w = saddle(60, lam_min, gradient, 0.05, seed=7, diagonal=True)
            result, w_measured, _ = measure_quadratic(a, g, w, 0.05, kind="keskar")
            exact = 100 * exact_worst_case(a, g, w_measured, 0.05, "linf", True, eta=1.0, diagonal=True)
            assert result.value == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize(
    ("d", "lam_min", "steps"), [(60, -4.0, 20), (200, -4.0, 40), (60, -50.0, 40), (200, -50.0, 60)]
)
def test_worst_case_l2_on_evenly_spaced_spectra_within_the_budgets_reach(d, lam_min, steps, one_thread):
    """The limit: ``steps`` gradients span a Krylov space of degree about ``steps``, which must resolve the top
    eigenvalue against the whole spectrum's width. Evenly spaced eigenvalues from λ_min to 1 are the hard case
    of that (at d = 200, λ_min = −50, the top gap is 0.5% of the width): 20 gradients reach within 5% at d = 60,
    λ_min = −4, and the budgets here beyond it (at 20 gradients: 5.5%, 25% and 56% short for the next three
    rows; the old ascent, at these budgets, 24% short or more)."""
    failures = []
    for gradient in ("none", "small", "orthogonal"):
        for seed in range(2):
            gen = torch.Generator().manual_seed(seed)
            q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
            lam = torch.linspace(lam_min, 1.0, d, dtype=torch.float64).flip(0)
            a = (q * lam) @ q.T
            g = torch.randn(d, generator=gen, dtype=torch.float64)
            if gradient == "orthogonal":
                g = g - (g @ q[:, 0]) * q[:, 0]
            g = g / g.norm() * 0.05 * (0.0 if gradient == "none" else 0.3)
            result, _, _ = measure_quadratic(0.5 * (a + a.T), g, torch.zeros(d, dtype=torch.float64), 0.05, steps=steps)
            exact = trust_region_max(0.5 * (a + a.T), g, 0.05)
            if not 0.95 * exact <= result.value <= exact * (1 + 1e-6):
                failures.append(f"g={gradient} seed={seed}: {result.value:.5g} vs {exact:.5g}")
    assert not failures, "\n".join(failures)


def _least_squares_float32(seed: int = 0):
    """float32 least squares at its minimum up to rounding: y = fl(Xw), so the gradient is float noise. A = XᵀX/n
    has eigenvalues 1, fifty in [0.88, 0.9] and the rest in [0.05, 0.5]: the cluster just below the top holds a
    power iteration (the old ascent) 5% short after 20 gradients; a Krylov space separates the top at once."""
    gen = torch.Generator().manual_seed(seed)
    n, d = 400, 100
    u = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    lam = torch.cat([torch.tensor([1.0]), torch.linspace(0.88, 0.9, 50), torch.linspace(0.05, 0.5, d - 51)]).double()
    x = (u * lam.sqrt() * n**0.5) @ v.T
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    x32, w32 = x.float(), w.float()
    y = (x32.double() @ w32.double()).float().reshape(-1, 1)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w32.reshape(1, -1))
    top = torch.linalg.eigvalsh(x32.double().T @ x32.double() / n)[-1].item()
    return model, [(x32, y)], top


def test_worst_case_l2_at_an_exact_float32_minimum_is_reproducible_and_accurate():
    """The issue: at an exact float32 minimum the first step follows the float noise of a zero gradient, and the
    value was 0.0% or 5.0% off ½ρ²λ_max from run to run. Now: the same seed gives the same number, and every
    seed is within 3% of ½ρ²λ_max."""
    model, batches, top = _least_squares_float32()
    with LossOperator(model, mse, batches) as op:
        _, grad = op.gradient()
    assert 0 < grad.norm().item() < 1e-4  # float noise, not zero
    exact = 0.5 * RHO**2 * top
    for seed in range(5):
        first = sharpness(model, mse, batches, RHO, generator=torch.Generator().manual_seed(seed))
        again = sharpness(model, mse, batches, RHO, generator=torch.Generator().manual_seed(seed))
        assert first == again
        assert first == pytest.approx(exact, rel=0.03)
        assert first <= exact * (1 + 1e-4)


@pytest.mark.parametrize("kind", ["worst_case", "keskar"])
def test_worst_case_spends_steps_gradients_and_one_loss(kind):
    """The budget is that of the old ascent (the issue allows at most 1.5x at a minimum): ``steps`` gradients
    and one loss, at a minimum, at a saddle, and on a network (where the model is not quadratic)."""
    norm = None if kind == "keskar" else "l2"
    for gradient, lam_min in (("none", 0.1), ("small", -4.0)):
        a, g, w = saddle(60, lam_min, gradient, 0.05, seed=0)
        for steps in (1, 2, 3, 7, 20):
            result, _, counts = measure_quadratic(a, g, w, 0.05, steps=steps, kind=kind, norm=norm)
            assert counts == [steps, 1] and (result.num_gradients, result.num_losses) == (steps, 1)
    x, y = digits(128)
    net = _relu_net()
    with LossOperator(net, _ce, [(x.double(), y)]) as op:
        calls = [0, 0]
        gradient, loss = op.gradient, op.loss
        op.gradient = lambda *a: (calls.__setitem__(0, calls[0] + 1), gradient(*a))[1]
        op.loss = lambda *a: (calls.__setitem__(1, calls[1] + 1), loss(*a))[1]
        result = sharpness_estimate(op, 2.0, kind=kind, norm=norm, steps=20)
    assert calls == [20, 1] and result.value > 0


def test_worst_case_linf_with_a_non_diagonal_hessian_is_a_lower_bound(one_thread):
    """What holds off the diagonal: maximizing an indefinite (or convex) quadratic over a box is NP-hard, and
    the ℓ∞ ascent finds a local maximum. Against brute force over every face (d ≤ 8): never above it, and
    within 5% once the gradient dominates the curvature (‖g‖ ≥ 10ρ·max|λ|, where the maximizer is SAM's
    vertex or next to it). Measured on random rotations (not asserted): with λ_min = −0.5 and no gradient, half
    the cases within 5% and the worst 100% short (0 found); both the old sign ascent and this one."""
    for d in (4, 6, 8):
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            lam = torch.cat([torch.tensor([1.0, -0.5]), -0.5 + 1.5 * torch.rand(d - 2, generator=gen)]).double()
            q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
            a = (q * lam) @ q.T
            a = 0.5 * (a + a.T)
            for scale in (0.0, 0.3, 10.0):
                g = torch.randn(d, generator=gen, dtype=torch.float64)
                g = g / g.norm() * 0.05 * scale
                result, _, _ = measure_quadratic(a, g, torch.zeros(d, dtype=torch.float64), 0.05, norm="linf")
                exact = box_max_brute_force(a, g, 0.05)
                assert result.value <= exact * (1 + 1e-9) + 1e-15
                if scale == 10.0:
                    assert result.value == pytest.approx(exact, rel=0.05)


def test_ascent_step_norm_is_in_the_gradients_precision():
    """The issue: the global norm was taken in float32 even for float64 gradients (relative error 3.6e-8)."""
    from lightning_landscape.functional._perturbation import ascent_step

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(1000, generator=gen, dtype=torch.float64) * 1e3, torch.randn(7, generator=gen).double()]
    weights = [torch.randn(1000, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen).double()]
    for adaptive in (False, True):
        eps = torch.cat(ascent_step(grads, weights, 0.05, adaptive=adaptive, eta=0.01))
        g, w = torch.cat(grads), torch.cat(weights)
        c = (w.abs() + 0.01) if adaptive else torch.ones_like(w)
        reference = 0.05 * c * c * g / (c * g).norm()
        assert ((eps - reference).norm() / reference.norm()).item() < 1e-15
        assert eps.dtype == torch.float64
    # float32 gradients keep a float32 norm; bfloat16 ones get one in float32 (not in bfloat16)
    eps = ascent_step([torch.full((300,), 0.1, dtype=torch.bfloat16)], None, 1.0)[0]
    assert eps.dtype == torch.bfloat16 and eps.float().norm().item() == pytest.approx(1.0, rel=1e-2)
