"""Accuracy and product counts of our Hessian estimators against a dense float64 Hessian.

    python benchmarks/hessian_accuracy.py

The digits MLP of the tests (64-24-10 tanh, 1,810 parameters) on 450 samples in three uneven batches,
at initialization and after 300 full-batch SGD steps (lr 0.5); then 5 more steps for the warm start.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _models import cross_entropy, dense_hessian, digits, digits_mlp

from lightning_landscape import functional as LF


def _train(model, x, y, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        cross_entropy(model, (x, y)).backward()
        opt.step()


def main() -> None:
    x, y = digits(512)
    batches = [(x[:200], y[:200]), (x[200:400], y[200:400]), (x[400:450], y[400:450])]
    print(f"{'point':<10} {'estimate':<26} {'HVPs':>5} {'rel. error':>11}")
    for label, steps in (("init", 0), ("trained", 300)):
        model = digits_mlp()
        _train(model, x, y, steps)
        h = dense_hessian(model, cross_entropy, batches)
        exact = torch.linalg.eigvalsh(h).flip(0)
        r1 = LF.hessian_eigenvalues(model, cross_entropy, batches, k=1)
        err1 = abs(r1.eigenvalues[0] - exact[0]) / exact[0]
        print(f"{label:<10} {'top-1, cold start':<26} {r1.num_hvps:>5} {err1:>11.1e}")
        r3 = LF.hessian_eigenvalues(model, cross_entropy, batches, k=3)
        err3 = ((r3.eigenvalues - exact[:3]).abs() / exact[:3]).max()
        print(f"{label:<10} {'top-3 (max over the 3)':<26} {r3.num_hvps:>5} {err3:>11.1e}")
        t = LF.hessian_trace(model, cross_entropy, batches)
        tr = h.trace().item()
        print(f"{label:<10} {'trace, Hutch++ (default)':<26} {t.num_hvps:>5} {abs(t.estimate - tr) / abs(tr):>11.1e}"
              f"   (estimate {t.estimate:.4f} ± {t.stderr:.4f}, exact {tr:.4f})")  # fmt: skip
        moved = copy.deepcopy(model)
        _train(moved, x, y, 5)
        exact2 = torch.linalg.eigvalsh(dense_hessian(moved, cross_entropy, batches)).flip(0)
        w = LF.hessian_eigenvalues(moved, cross_entropy, batches, k=1, init=r1.eigenvectors)
        errw = abs(w.eigenvalues[0] - exact2[0]) / exact2[0]
        print(f"{label:<10} {'top-1, warm, 5 steps later':<26} {w.num_hvps:>5} {errw:>11.1e}")


if __name__ == "__main__":
    main()
