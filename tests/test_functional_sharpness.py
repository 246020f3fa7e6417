"""Sharpness against closed forms on linear least squares at its exact minimum, and its invariances.

With ``L(w) = ½·mean((Xw − y)²)`` the Hessian is ``A = XᵀX/n`` everywhere and at the minimum
``L(w* + δ) − L(w*) = ½ δᵀAδ`` exactly, so (``C = diag(c)``):

- worst case, ℓ2: ``max over ‖δ/c‖₂ ≤ ρ`` is ``½ρ²·λ_max(CAC)``;
- worst case, ℓ∞, ``A`` diagonal: every vertex of the box is a maximizer, ``½ρ²·Σ a_i c_i²``;
- average case: ``½·E[zᵀCACz]`` is ``½(ρ²/d)·tr(CAC)`` (ℓ2) and ``½(ρ²/3)·tr(CAC)`` (ℓ∞);
- keskar (``A`` diagonal): ``100·½ρ²·Σ a_i (|w_i| + 1)² / (1 + L(w*))``.

Models are float64 so that the minimum is exact; its gradient is then rounding noise (or exactly
zero), so the ascent starts from an effectively random direction and behaves as a power iteration.
Tolerances:

- worst case ℓ2, 3% (the issue's). Like any power iteration the ascent needs the top eigenvalue
  separated from the rest, as Hessians of trained networks have it (outliers above a bulk). The
  design here has λ₂/λ₁ ≈ 0.45 (0.25 for the adaptive CAC): over 100 random starts the 20-step
  error was at most 2e-8. (With λ₂/λ₁ ≈ 0.8 it was 1% at the 5th percentile and 19% for the worst
  of 100 starts; with 0.92, up to 10% — no 20-step method from a random start is safe there.)
- average case: the estimate's relative standard deviation is ``sqrt(2·tr(M²))/tr(M)/sqrt(samples)``
  for ``M = CAC`` (``½zᵀMz`` per draw, ``z`` Gaussian): 4.0% here for the plain ℓ2 case at 20 draws
  (measured over 100 seeds: 4.1%), so the issue's 15% is more than three standard deviations; the
  adaptive case (effective rank 15: 9% at 20 draws) takes 100 draws and is held to four of its
  standard deviations, computed the same way (3.6%).
- vertices of a box (ℓ∞ on a diagonal ``A``, keskar): exact up to the float32 rounding of the
  operator's loss, so 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import digits
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
