#!/usr/bin/env python
"""Wall time of the top eigenvalue of the Hessian against the GGN and the Fishers, and what one product costs.

    python benchmarks/curvature.py            # --quick, --device cpu|cuda, --models mlp,cnn, --threads N

For the digits MLP and CNN of ``_bench_models.py`` (trained 200 full-batch SGD steps, probe batch of 512): the top
eigenvalue (tol 1e-3, as the callbacks ask) of the Hessian (``hessian_eigenvalues``, ``hvp_method="auto"``), of the
GGN, of the Monte-Carlo Fisher and of the empirical Fisher (``curvature=...``, ``output_loss="cross_entropy"``),
with the products each took and the median wall time of a whole call; then the time of one product, single and
batched over 8 vectors, of the Hessian (``LossOperator``, the method ``auto`` chose) and of the GGN
(``CurvatureOperator``), in gradients (the wall time of one ``gradient()``). If ``curvlinops-for-pytorch`` is
installed, its ``GGNLinearOperator`` products are timed on the same model and batch; otherwise that row says so.
Target (issue 15): GGN top-1 at most the Hessian's wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from _bench_models import digits_net, load_digits, loss_fn, machine_info, set_threads, timed, train_sgd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_landscape.functional.curvature import CurvatureOperator
from lightning_landscape.functional.eigen import hessian_eigenvalues
from lightning_landscape.functional.hvp import LossOperator


def _top1(model, batches, curvature: str):
    kw = {} if curvature == "hessian" else {"curvature": curvature, "output_loss": "cross_entropy"}
    return hessian_eigenvalues(model, None if kw else loss_fn, batches, k=1, **kw)


def _per_product(op, device, repeats: int) -> tuple[float, float, float]:
    """(seconds of one gradient, of one product, of a block of 8 products, per vector)."""
    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, op.size, generator=g).to(device=device, dtype=op.dtype)
    eight = torch.randn(8, op.size, generator=g).to(device=device, dtype=op.dtype)
    _, grad_s = timed(op.gradient, device, repeats)
    _, one_s = timed(lambda: op.matmat(one), device, repeats, warmup=2)
    _, eight_s = timed(lambda: op.matmat(eight), device, repeats, warmup=2)
    return grad_s, one_s, eight_s / 8


def _curvlinops(model, batches, device, repeats: int) -> str:
    if importlib.util.find_spec("curvlinops") is None:
        return "curvlinops: not installed (pip show curvlinops-for-pytorch): ours only"
    from curvlinops import GGNLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = GGNLinearOperator(model, torch.nn.CrossEntropyLoss(), params, batches)
    v = torch.randn(sum(p.numel() for p in params)).numpy()
    _, s = timed(lambda: op @ v, device, repeats, warmup=1)
    return f"curvlinops GGNLinearOperator: one product {s * 1e3:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    set_threads(args.threads, device)
    repeats = 3 if args.quick else 7
    print(machine_info(device))
    x, y = load_digits(device, seed=0)
    batches = [(x[:512], y[:512])]
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = digits_net(name).to(device)
        train_sgd(model, x[:512], y[:512], 50 if args.quick else 200)
        n = sum(p.numel() for p in model.parameters())
        print(f"\n{name} ({n:,} parameters), probe batch 512: top-1 eigenvalue, tol 1e-3")
        print(f"  {'curvature':<17} {'λ1':>9} {'products':>8} {'wall ms':>8} {'vs Hessian':>10}  method")
        hessian_s = None
        for curvature in ("hessian", "ggn", "fisher", "empirical_fisher"):
            result, s = timed(lambda m=model, c=curvature: _top1(m, batches, c), device, repeats)
            hessian_s = hessian_s or s
            print(
                f"  {curvature:<17} {float(result.eigenvalues[0]):9.5f} {result.num_hvps:8d} {s * 1e3:8.1f}"
                f" {s / hessian_s:9.2f}x  {result.hvp_method}"
            )
        print("  one product, in gradients (single / per vector of a block of 8):")
        with LossOperator(model, loss_fn, batches) as h, CurvatureOperator(model, batches) as g:
            h.matmat(torch.zeros(1, h.size, device=device) + 1.0)  # (auto chooses its method)
            for label, op in (("hessian", h), ("ggn", g)):
                grad_s, one_s, eight_s = _per_product(op, device, repeats)
                print(f"    {label:<8} {one_s / grad_s:5.2f} / {eight_s / grad_s:5.2f}   ({op.method})")
        print(f"  {_curvlinops(model, batches, device, repeats)}")


if __name__ == "__main__":
    main()
