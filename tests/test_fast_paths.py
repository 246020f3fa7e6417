"""The small-model fast path of ``LossOperator`` (issue 14, the small end): a settled single-vector product taken
straight from the kept gradient graph is bitwise the general path's, and is taken only when everything is settled."""

from __future__ import annotations

import torch
from _models import cross_entropy, digits, digits_mlp

from lightning_landscape.functional import LossOperator, top_eigenvalues


def test_kept_product_is_bitwise_the_general_one():
    x, y = digits(128)
    with LossOperator(digits_mlp(), cross_entropy, [(x, y)]) as op:
        g = torch.Generator().manual_seed(0)
        assert op._kept_hvp(torch.randn(1, op.size, generator=g)) is None  # not settled: method not chosen yet
        op.hvp(torch.randn(1, op.size, generator=g))  # chooses and checks the method, keeps the graph
        for _ in range(3):
            v = torch.randn(1, op.size, generator=g)
            kept = op._kept_hvp(v)
            assert kept is not None  # the fast path is taken
            assert torch.equal(kept, op._products(v))  # the general path: the same bits
            assert torch.equal(op.hvp(v), kept)


def test_no_fast_path_over_several_probe_parts():
    x, y = digits(128)
    with LossOperator(digits_mlp(), cross_entropy, [(x[:64], y[:64]), (x[64:], y[64:])]) as op:
        v = torch.randn(1, op.size, generator=torch.Generator().manual_seed(0))
        op.hvp(v)
        assert op._kept_hvp(v) is None  # two weighted parts: the general path sums them


def test_top1_is_reproducible_on_the_fast_path():
    x, y = digits(128)
    results = []
    for _ in range(2):
        with LossOperator(digits_mlp(), cross_entropy, [(x, y)]) as op:
            results.append(top_eigenvalues(op, 1, tol=1e-6, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(results[0].eigenvalues, results[1].eigenvalues) and results[0].converged
