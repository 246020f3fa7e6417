#!/usr/bin/env python
"""HVP counts and correctness of the top-k eigensolver, on non-degenerate and repeated spectra, cold and warm.

    python benchmarks/eigen_counts.py            # prints one table; --seeds N for more start vectors

For each case it runs ``top_eigenvalues`` (tol 1e-3, at most 300 products) from several random starts and reports
the median and largest number of Hessian-vector products, the largest relative error of the k eigenvalues against
the exact ones, and how often the solver said ``converged``. Products are float32 unless the case says ``f64``.
Cases:

- ``mlp k=…``: the Hessian of a trained digits MLP (1,810 parameters; non-degenerate top spectrum), as a
  dense float64 matrix, so the exact eigenvalues are known;
- ``zero-head k=3``: a 3-class linear head initialised at zero, whose Hessian has a repeated top
  eigenvalue ``[λ1, λ1, λ3]`` exactly (``f64``: in float64, where rounding does not break the tie);
- ``5-class head k=5``: the same with 5 classes, ``[λ1 ×4, λ5]`` (a multiplicity above the block of 3);
- ``[2,2,2,1,…] k=3`` and ``k=4``: a diagonal spectrum with a triple top eigenvalue, rotated at random;
- ``warm mlp k=…``: the ``mlp`` Hessian after 5 more SGD steps, started from the top-k eigenvectors before them
  (what a periodic measurement does);
- ``warm trap k=…``: spectrum ``[3, 2, 1.5, 1.2, 1.1, …]`` (n = 200) started from the exact eigenvectors of
  ``2, 1.5, …``: the top direction is orthogonal to all of ``init`` and must still be found.

Single-start Lanczos (before block Lanczos) took 8, 13, 15 and 16 products (median) on ``mlp k=1, 2, 3, 5``;
``tests/test_functional_hessian.py`` holds the block solver to 1.5x of the k = 1, 3, 5 figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _models import cross_entropy, dense_hessian, digits, digits_mlp

from lightning_landscape.functional import DenseOperator, top_eigenvalues


def _trained_mlp_hessians(more_steps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hessian after 100 full-batch SGD steps, and after ``more_steps`` more."""
    x, y = digits(512)
    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hessians = []
    for steps in (100, more_steps):
        for _ in range(steps):
            opt.zero_grad()
            cross_entropy(model, (x, y)).backward()
            opt.step()
        hessians.append(dense_hessian(model, cross_entropy, [(x[:256], y[:256])]))
    return hessians[0], hessians[1]


def _zero_head_hessian(classes: int = 3) -> torch.Tensor:
    x, y = digits(256)
    x, y = x[y < classes], y[y < classes]
    head = torch.nn.Linear(64, classes, bias=False)
    torch.nn.init.zeros_(head.weight)
    return dense_hessian(head, cross_entropy, [(x, y)])


def _rotated(values: list[float], n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rest = torch.rand(n - len(values), generator=g, dtype=torch.float64) * 0.9
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.cat([torch.tensor(values, dtype=torch.float64), rest])) @ q.T, q


def _top_vectors(matrix: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigh(matrix)[1].flip(1)[:, :k].T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="random start vectors per case")
    args = parser.parse_args()
    torch.manual_seed(0)
    mlp, mlp_later = _trained_mlp_hessians()
    triple, _ = _rotated([2, 2, 2, 1], 200)
    trap, trap_vectors = _rotated([3, 2, 1.5, 1.2, 1.1], 200)
    f32, f64 = torch.float32, torch.float64
    # (name, matrix, k, dtype, init)
    cases = [(f"mlp k={k}", mlp, k, f32, None) for k in (1, 2, 3, 5)]
    cases += [
        ("zero-head k=3", _zero_head_hessian(), 3, f32, None),
        ("zero-head f64 k=3", _zero_head_hessian(), 3, f64, None),
    ]
    cases += [("5-class head f64 k=5", _zero_head_hessian(5), 5, f64, None)]
    cases += [("[2,2,2,1,…] k=3", triple, 3, f32, None), ("[2,2,2,1,…] k=4", triple, 4, f32, None)]
    cases += [(f"warm mlp k={k}", mlp_later, k, f32, _top_vectors(mlp, k)) for k in (1, 3, 5)]
    cases += [(f"warm trap k={k}", trap, k, f32, trap_vectors[:, 1 : k + 1].T) for k in (1, 3)]
    print(f"{'case':<21} {'HVPs (median)':>13} {'HVPs (max)':>10} {'max rel. error':>15} {'converged':>10}")
    for name, matrix, k, dtype, init in cases:
        exact = torch.linalg.eigvalsh(matrix).flip(0)[:k]
        counts, errors, flags = [], [], []
        for seed in range(args.seeds):
            r = top_eigenvalues(
                DenseOperator(matrix.to(dtype)),
                k,
                init=None if init is None else init.to(dtype),
                tol=1e-3,
                max_hvps=300,
                generator=torch.Generator().manual_seed(seed),
            )
            counts.append(r.num_hvps)
            errors.append(float(((r.eigenvalues - exact).abs() / exact.abs()).max()))
            flags.append(r.converged)
        print(
            f"{name:<21} {statistics.median(counts):>13} {max(counts):>10} {max(errors):>15.2e} "
            f"{sum(flags):>6}/{len(flags)}"
        )


if __name__ == "__main__":
    main()
