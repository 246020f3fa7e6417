"""Loss slices against closed forms: filter normalization, exact quadratic grids, NaN handling, invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _models import cross_entropy, digits, digits_mlp
from _state import assert_same, snapshot
from matplotlib.contour import ContourSet
from torch import nn

from lightning_landscape.functional.hvp import MeasurementError
from lightning_landscape.functional.surface import (
    filter_normalize,
    grid_coords,
    loss_line,
    loss_surface,
    random_directions,
)
from lightning_landscape.plotting import figure_to_array, line_figure, surface_figure

pytestmark = pytest.mark.usefixtures("one_thread")


def _half_squares(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()


def _least_squares(seed: int = 0):
    """Linear(5, 3) in float64 at a random (not optimal) θ, two batches of unequal size."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(5, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = torch.randn(20, 3, generator=g, dtype=torch.float64)
    return model, [(x[:13], y[:13]), (x[13:], y[13:])], x, y


def _quadratic_reference(model: nn.Linear, x, y, v: torch.Tensor) -> float:
    """L(θ + v) = L(θ) + gᵀv + ½ vᵀAv with A = X̃ᵀX̃/n per output row, X̃ = [X, 1]; v in [weight, bias] layout."""
    n = x.shape[0]
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    theta = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], dim=1)  # [3, 6]
    vv = torch.cat([v[:15].reshape(3, 5), v[15:][:, None]], dim=1)  # [3, 6]
    a = xa.T @ xa / n
    residual = xa @ theta.T - y  # [n, 3]
    base = 0.5 * residual.pow(2).sum(1).mean()
    linear = (residual * (xa @ vv.T)).sum(1).mean()
    quadratic = 0.5 * sum(vv[k] @ a @ vv[k] for k in range(3))
    return float(base + linear + quadratic)


# ---------------------------------------------------------------------------------------------- exact values
def test_surface_matches_quadratic_closed_form():
    model, batches, x, y = _least_squares()
    dirs = random_directions(model, torch.Generator().manual_seed(1), include_1d=True)
    s = loss_surface(model, _half_squares, batches, steps=7, distance=0.9, directions=dirs)
    assert torch.equal(s.coords, grid_coords(7, 0.9)) and s.coords[3] == 0.0
    expected = torch.tensor(
        [[_quadratic_reference(model, x, y, a * dirs[0] + b * dirs[1]) for b in s.coords] for a in s.coords],
        dtype=torch.float64,
    )
    # float64 throughout: the only error is rounding in sums of ~20 terms of size O(10)
    torch.testing.assert_close(s.losses, expected, rtol=1e-12, atol=1e-12)
    # the bias moved too (include_1d): the grid is not that of the weight alone
    assert dirs[0, 15:].abs().sum() > 0


def test_line_matches_quadratic_closed_form_and_surface_midline():
    model, batches, x, y = _least_squares(seed=3)
    d = random_directions(model, torch.Generator().manual_seed(2), count=1)[0]
    assert torch.equal(d[15:], torch.zeros(3))  # biases are not moved by default
    line = loss_line(model, _half_squares, batches, steps=9, distance=2.0, direction=d)
    expected = torch.tensor([_quadratic_reference(model, x, y, a * d) for a in line.coords], dtype=torch.float64)
    torch.testing.assert_close(line.losses, expected, rtol=1e-12, atol=1e-12)
    # the same direction as the plane's first one: the line is the plane's b = 0 column, bit for bit
    eta = random_directions(model, torch.Generator().manual_seed(5), count=1)[0]
    s = loss_surface(model, _half_squares, batches, steps=9, distance=2.0, directions=[d, eta])
    assert torch.equal(s.losses[:, 4], line.losses)


def test_center_is_the_loss_at_the_weights():
    x, y = digits(300)
    model = digits_mlp()
    batches = [(x[:200], y[:200]), (x[200:], y[200:])]
    s = loss_surface(model, cross_entropy, batches, steps=5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = (
            200 * cross_entropy(model, batches[0]).double() + 100 * cross_entropy(model, batches[1]).double()
        ) / 300
    # same float32 forward passes on the same values; only the weighting is float64 in both
    assert s.center_loss == pytest.approx(float(direct), rel=1e-6)
    assert s.losses.dtype == torch.float64 and s.losses.device.type == "cpu"
    # the grid actually moves: every other point differs from the centre
    assert (s.losses != s.losses[2, 2]).sum() == 24


def test_one_forward_pass_per_point_and_batch():
    model, batches, _, _ = _least_squares()
    calls = []

    def counting(m, b):
        calls.append(1)
        return _half_squares(m, b)

    # plus one forward pass (with grad, on the first batch) that checks the loss reads the substituted parameters
    loss_surface(model, counting, batches, steps=21)
    assert len(calls) == 21 * 21 * len(batches) + 1
    calls.clear()
    loss_line(model, counting, batches, steps=41)
    assert len(calls) == 41 * len(batches) + 1


# ---------------------------------------------------------------------------------------------- directions
def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def _filter_norms(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def test_filter_normalization_per_filter_norms():
    net = _cnn()
    with torch.no_grad():
        net[0].weight[2].zero_()  # an all-zero filter
        net[7].weight[4].zero_()  # an all-zero linear row
    named = dict(net.named_parameters())
    for include_1d in (False, True):
        dirs = random_directions(net, torch.Generator().manual_seed(0), count=2, include_1d=include_1d)
        assert torch.isfinite(dirs).all()
        for row in dirs:
            offset = 0
            for name, p in named.items():
                d = row[offset : offset + p.numel()].reshape(p.shape)
                offset += p.numel()
                if p.dim() >= 2:
                    torch.testing.assert_close(_filter_norms(d), _filter_norms(p.detach()), rtol=1e-5, atol=0)
                elif include_1d:
                    torch.testing.assert_close(d.norm(), p.detach().norm(), rtol=1e-5, atol=0)
                else:
                    assert torch.equal(d, torch.zeros_like(d)), name
            assert offset == row.numel()
        conv0 = dirs[:, : 6 * 9].reshape(2, 6, 9)
        assert torch.equal(conv0[:, 2], torch.zeros(2, 9))  # the zero filter gets a zero direction
    # BatchNorm biases are zero at init: with include_1d their direction is zero, not NaN
    dirs = random_directions(net, torch.Generator().manual_seed(0), include_1d=True)
    bn_bias = dirs[0, 6 * 9 + 12 : 6 * 9 + 18]  # after conv0.weight, conv0.bias, bn.weight
    assert torch.equal(bn_bias, torch.zeros(6))


def test_filter_normalize_zero_direction_filter_and_rescaling():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]]))
        lin.bias.copy_(torch.tensor([3.0, 4.0]))
    raw = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0, -7.0, 0.0, 0.0]])
    out = filter_normalize(lin, raw, include_1d=True)
    expected = torch.tensor(
        [
            [0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 5 / math.sqrt(2), 5 / math.sqrt(2)],  # zero raw filter stays zero
            [math.sqrt(3), math.sqrt(3), math.sqrt(3), 0.0, 0.0, -5.0, 0.0, 0.0],  # zero raw bias stays zero
        ]
    )
    torch.testing.assert_close(out, expected)
    assert torch.equal(raw[0, :3], torch.zeros(3))  # input untouched
    # already normalized directions are a fixed point; a single vector keeps its shape
    torch.testing.assert_close(filter_normalize(lin, out[0], include_1d=True), out[0])
    # rescaling the weights rescales the directions filter by filter (scale invariance of the picture)
    with torch.no_grad():
        lin.weight[0].mul_(10.0)
    scaled = filter_normalize(lin, raw, include_1d=True)
    torch.testing.assert_close(scaled[1, :3], 10 * expected[1, :3])
    torch.testing.assert_close(scaled[1, 3:], expected[1, 3:])


def test_directions_reproducible_from_generator_only():
    net = digits_mlp()
    state = torch.random.get_rng_state()
    a = random_directions(net, torch.Generator().manual_seed(7))
    b = random_directions(net, torch.Generator().manual_seed(7))
    c = random_directions(net, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.random.get_rng_state())
    # the raw draw is the generator's standard normal sample, then normalized
    raw = torch.randn(2, a.shape[1], generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, filter_normalize(net, raw))
    # subsets of parameters: the layout of those parameters only
    sub = random_directions(net, torch.Generator().manual_seed(7), params=[net[2].weight])
    assert sub.shape == (2, 24 * 10)


# ---------------------------------------------------------------------------------------------- BatchNorm, invariants
def test_batchnorm_cnn_from_init():
    net = _cnn()
    x, y = digits(64)
    batches = [(x.reshape(-1, 1, 8, 8), y)]
    s = loss_surface(net, cross_entropy, batches, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(s.losses).all()
    net.eval()
    with torch.no_grad():
        center = cross_entropy(net, batches[0])
    assert s.center_loss == pytest.approx(float(center), rel=1e-6)
    assert s.rise_at_edge() > 0  # an untrained net is still not at a maximum along random directions
    s1d = loss_surface(net, cross_entropy, batches, steps=3, include_1d=True, generator=torch.Generator())
    assert torch.isfinite(s1d.losses).all()


@pytest.mark.parametrize("eval_mode", [True, False])
def test_weights_buffers_grads_modes_rng_untouched(eval_mode):
    net = _cnn()
    net.insert(7, nn.Dropout(0.5))
    net[0].bias.requires_grad_(False)
    x, y = digits(32)
    batches = [(x.reshape(-1, 1, 8, 8), y)]
    cross_entropy(net, batches[0]).backward()  # .grad set and must stay
    net[4].eval()  # a mixed mode (one BatchNorm in eval) must come back exactly
    before = snapshot(net)
    s = loss_surface(net, cross_entropy, batches, steps=3, eval_mode=eval_mode, generator=torch.Generator())
    line = loss_line(net, cross_entropy, batches, steps=3, eval_mode=eval_mode, generator=torch.Generator())
    assert_same(before, snapshot(net))
    assert torch.isfinite(s.losses).all() and torch.isfinite(line.losses).all()
    # the frozen parameter is not moved
    assert s.directions.shape[1] == sum(p.numel() for p in net.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- divergence
def _diverging_loss(model, x):
    """w0² + w1², but +inf where w0 > 1.6 and NaN where w1 < 0.4 (a stand-in for a diverging network)."""
    w = model.weight.reshape(-1)
    value = (w**2).sum() + 0.0 * model(x).sum()
    value = torch.where(w[0] > 1.6, torch.full_like(value, math.inf), value)
    return torch.where(w[1] < 0.4, torch.full_like(value, math.nan), value)


def test_nonfinite_points_stay_nan_and_are_masked_in_the_figure():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = loss_surface(model, _diverging_loss, [torch.zeros(4, 2)], steps=5, distance=1.0, directions=dirs)
    w0 = 1.0 + s.coords[:, None].expand(5, 5)  # a along rows
    w1 = 1.0 + s.coords[None, :].expand(5, 5)  # b along columns
    bad = (w0 > 1.6) | (w1 < 0.4)
    assert torch.equal(s.losses.isnan(), bad)  # +inf became NaN too
    torch.testing.assert_close(s.losses[~bad], (w0**2 + w1**2)[~bad])
    assert s.nonfinite_fraction == pytest.approx(bad.double().mean().item())
    ring = torch.ones(5, 5, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    finite_ring = (w0**2 + w1**2)[ring & ~bad]
    assert s.rise_at_edge() == pytest.approx(float(finite_ring.mean()) - 2.0)

    fig = surface_figure(s.coords, s.losses)
    contours = [c for c in fig.axes[0].collections if isinstance(c, ContourSet)]
    filled = next(c for c in contours if c.filled)
    finite = s.losses[~bad]
    # colour range and levels come from the finite values only (log scale, all > 0)
    assert filled.norm.vmin == pytest.approx(float(finite.min())) and filled.norm.vmax == pytest.approx(
        float(finite.max())
    )
    assert np.isfinite(filled.levels).all() and type(filled.norm).__name__ == "LogNorm"
    assert figure_to_array(fig).shape[2] == 3  # renders
    line_fig = line_figure(s.coords, s.losses[2], s.losses[:, 2])
    train, val = (np.asarray(line.get_ydata()) for line in line_fig.axes[0].get_lines()[:2])
    assert np.isnan(train[0]) and np.isfinite(train[1:]).all()  # b = -1: w1 = 0 < 0.4
    assert np.isnan(val[-1]) and np.isfinite(val[:-1]).all()  # a = 1: w0 = 2 > 1.6
    assert line_fig.axes[0].get_yscale() == "log"


def test_all_nonfinite_surface_still_draws():
    c = grid_coords(3, 1.0)
    fig = surface_figure(c, torch.full((3, 3), math.nan, dtype=torch.float64))
    assert figure_to_array(fig).ndim == 3
    fig = surface_figure(c, torch.tensor([[-1.0, 0.0, 1.0]] * 3))  # a non-positive loss: linear colour
    filled = next(c for c in fig.axes[0].collections if isinstance(c, ContourSet) and c.filled)
    assert type(filled.norm).__name__ == "Normalize"


# ---------------------------------------------------------------------------------------------- data parallel
def test_reduce_fn_called_once_and_pools_processes():
    model, batches, _, _ = _least_squares()
    dirs = random_directions(model, torch.Generator().manual_seed(0))
    alone = loss_surface(model, _half_squares, batches, steps=5, directions=dirs)
    calls = []

    def twin(t):  # a second process with the same probe data: sums double, the mean is unchanged
        calls.append(t.shape)
        return 2 * t

    pooled = loss_surface(model, _half_squares, batches, steps=5, directions=dirs, reduce_fn=twin)
    assert calls == [torch.Size([25 + 2])]
    torch.testing.assert_close(pooled.losses, alone.losses, rtol=1e-15, atol=0)

    def other_rank_failed(t):
        out = t.clone()
        out[-1] = 1.0
        return out

    with pytest.raises(MeasurementError, match="at least one process"):
        loss_surface(model, _half_squares, batches, steps=3, directions=dirs, reduce_fn=other_rank_failed)
    calls.clear()

    def broken(m, b):
        raise RuntimeError("boom")

    with pytest.raises(MeasurementError) as info:  # a local failure still joins the collective, then raises
        loss_line(model, broken, batches, steps=3, direction=dirs[0], reduce_fn=twin)
    assert calls == [torch.Size([3 + 2])] and isinstance(info.value.__cause__, RuntimeError)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_arguments_name_the_argument():
    model, batches, _, _ = _least_squares()
    for steps in (4, 1, 0, 2.0, True, "21"):
        with pytest.raises(ValueError, match="`steps`"):
            loss_surface(model, _half_squares, batches, steps=steps)
        with pytest.raises(ValueError, match="`steps`"):
            loss_line(model, _half_squares, batches, steps=steps)
    for distance in (0, -1.0, math.nan, math.inf, "1"):
        with pytest.raises(ValueError, match="`distance`"):
            loss_surface(model, _half_squares, batches, distance=distance)
    with pytest.raises(ValueError, match="`count`"):
        random_directions(model, count=0)
    with pytest.raises(ValueError, match="`directions`"):
        loss_surface(model, _half_squares, batches, directions=torch.zeros(3, 18))
    with pytest.raises(ValueError, match="`direction`"):
        loss_line(model, _half_squares, batches, direction=torch.zeros(17))
    with pytest.raises(TypeError, match="`direction`"):
        loss_line(model, _half_squares, batches, direction=torch.zeros(18, dtype=torch.long))
    with pytest.raises(ValueError, match="`directions`"):
        filter_normalize(model, torch.zeros(2, 3, 18))
    with pytest.raises(TypeError, match="`loss_fn`"):
        loss_surface(model, None, batches)
    with pytest.raises(ValueError, match="`loss_fn`"):
        loss_line(model, lambda m, b: m(b[0]), batches, steps=3)
    with pytest.raises(ValueError, match="`batches`"):
        loss_line(model, _half_squares, [], steps=3)


def test_out_of_memory_splits_the_batch():
    """A probe batch that does not fit is evaluated in halves, sample-weighted (simulated on the CPU)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    x, y = digits(60)
    reference = loss_surface(net, cross_entropy, [(x, y)], steps=3, generator=torch.Generator().manual_seed(0))
    sizes = []

    def limited(model, batch):
        sizes.append(len(batch[0]))
        if len(batch[0]) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return cross_entropy(model, batch)

    got = loss_surface(net, limited, [(x, y)], steps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.losses, reference.losses, rtol=1e-6, atol=0)
    assert sizes[:3] == [60, 30, 15]  # the substitution check's one forward pass, halved until it fits
    assert sizes[3:7] == [60, 30, 15, 15]  # 60 -> halves of 30 -> quarters of 15, then kept
    assert max(sizes[10:]) == 15
