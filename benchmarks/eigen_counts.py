#!/usr/bin/env python
"""HVP counts and correctness of the top-k eigensolver, on non-degenerate and repeated spectra.

    python benchmarks/eigen_counts.py            # prints one table; --seeds N for more start vectors

For each case it runs ``top_eigenvalues`` (tol 1e-3) from several random starts and reports the median
number of Hessian-vector products, the largest relative error of the k eigenvalues against the exact
ones, and whether the solver said ``converged``. Cases:

- ``mlp k=…``: the Hessian of a trained digits MLP (1,810 parameters; non-degenerate top spectrum), as a
  dense float64 matrix, so the exact eigenvalues are known;
- ``zero-head k=3``: a 3-class linear head initialised at zero, whose Hessian has a repeated top
  eigenvalue ``[λ1, λ1, λ3]`` exactly;
- ``[2,2,2,1,…] k=3`` and ``k=4``: a diagonal spectrum with a triple top eigenvalue, rotated at random.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _models import cross_entropy, dense_hessian, digits, digits_mlp  # noqa: E402

from lightning_landscape.functional import DenseOperator, top_eigenvalues  # noqa: E402


def _trained_mlp_hessian() -> torch.Tensor:
    x, y = digits(512)
    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        cross_entropy(model, (x, y)).backward()
        opt.step()
    return dense_hessian(model, cross_entropy, [(x[:256], y[:256])])


def _zero_head_hessian() -> torch.Tensor:
    x, y = digits(256)
    x, y = x[y < 3], y[y < 3]
    head = torch.nn.Linear(64, 3, bias=False)
    torch.nn.init.zeros_(head.weight)
    return dense_hessian(head, cross_entropy, [(x, y)])


def _rotated(values: list[float], n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rest = torch.rand(n - len(values), generator=g, dtype=torch.float64) * 0.9
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.cat([torch.tensor(values, dtype=torch.float64), rest])) @ q.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="random start vectors per case")
    args = parser.parse_args()
    torch.manual_seed(0)
    mlp = _trained_mlp_hessian()
    cases = [(f"mlp k={k}", mlp, k) for k in (1, 2, 3, 5)]
    cases += [("zero-head k=3", _zero_head_hessian(), 3)]
    cases += [("[2,2,2,1,…] k=3", _rotated([2, 2, 2, 1], 200), 3), ("[2,2,2,1,…] k=4", _rotated([2, 2, 2, 1], 200), 4)]
    print(f"{'case':<18} {'HVPs (median)':>13} {'HVPs (max)':>10} {'max rel. error':>15} {'converged':>10}")
    for name, matrix, k in cases:
        exact = torch.linalg.eigvalsh(matrix).flip(0)[:k]
        counts, errors, flags = [], [], []
        for seed in range(args.seeds):
            r = top_eigenvalues(
                DenseOperator(matrix.float()), k, tol=1e-3, max_hvps=300, generator=torch.Generator().manual_seed(seed)
            )
            counts.append(r.num_hvps)
            errors.append(float(((r.eigenvalues - exact).abs() / exact.abs()).max()))
            flags.append(r.converged)
        print(
            f"{name:<18} {statistics.median(counts):>13} {max(counts):>10} {max(errors):>15.2e} "
            f"{sum(flags)}/{len(flags):>8}"
        )


if __name__ == "__main__":
    main()
