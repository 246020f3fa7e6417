#!/usr/bin/env python
"""Worst-case sharpness at saddles: the estimate against the exact maximum on quadratics, and the common case.

    python benchmarks/sharpness_saddle.py            # --quick: fewer rows; --threads N; --steps N

1. **Quadratics** ``L(θ) = gᵀ(θ − w) + ½(θ − w)ᵀA(θ − w)`` measured at ``θ = w`` (float32, ``λ_max = 1``), where
   the worst case is known exactly: ℓ2, the trust-region subproblem ``max gᵀCu + ½uᵀCACu`` over ``‖u‖₂ ≤ ρ``
   solved densely in float64 (``C = diag(c)``, ``c = 1`` plain, ``|w| + η`` adaptive); ℓ∞, the same over the
   box, coordinate by coordinate for a diagonal ``A``. Spectra: ``outliers`` (``1, 0.6, 0.35``,
   ``λ_min, λ_min/2, λ_min/5`` and a bulk in [−0.05, 0.2], as Hessians have), ``even`` (evenly spaced from
   ``λ_min`` to 1: the hardest case for a Krylov space); gradients: none (the saddle point itself), small
   (‖g‖ = 0.3ρ), large (3ρ), orthogonal (0.3ρ, no component on the top eigenvector: the trust region's hard
   case). Columns: the exact value, ours and its error, the gradients and losses it used, and the ascent this
   replaced (written below from the previous ``sharpness.py``: SAM's step at the best point, step size ×1.5 /
   ÷2; sign steps for ℓ∞) with the same budget.
2. **ℓ∞ off the diagonal** (d ≤ 8, random rotations): against brute force over every face of the box, since
   maximizing a quadratic over a box is NP-hard: a local maximum, a lower bound.
3. **The common case**: a digits MLP (``tests/_models.py``) trained with full-batch SGD, float32, at
   ``steps`` = 20 against ``steps`` = 100 (near convergence of the estimate), ours and the previous ascent.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_models import machine_info, set_threads
from _models import cross_entropy, digits, digits_mlp
from _quadratics import Quadratic, box_max_brute_force, box_max_diagonal, quadratic_loss, saddle, trust_region_max

from lightning_landscape.functional import LossOperator, sharpness_estimate
from lightning_landscape.functional._perturbation import ascent_step


# ---------------------------------------------------------------------------------------------- quadratics
# ---------------------------------------------------------------------------------------------- the previous ascent
def previous_ascent(
    op: LossOperator, rho: float, norm: str, adaptive: bool, eta: float, steps: int, seed: int
) -> float:
    """The worst case as ``sharpness.py`` computed it before this change (same budget: ``steps`` gradients, one
    loss): SAM's step at the best point so far times a step size (1, ×1.5 after a success, ÷2 after a failure),
    projected back; sign steps for ℓ∞; a random start where the gradient is exactly zero."""
    generator = torch.Generator().manual_seed(seed)
    w = op.parameter_vector()
    scale = (w.abs() + eta) if adaptive else None

    def project(delta: Tensor) -> Tensor:
        if norm == "linf":
            return (
                delta.clamp(-rho, rho)
                if scale is None
                else torch.maximum(torch.minimum(delta, rho * scale), -rho * scale)
            )
        u = delta if scale is None else torch.where(scale > 0, delta / scale, torch.zeros_like(delta))
        return delta * (rho / u.norm().clamp_min(1e-300)).clamp(max=1.0)

    if norm == "l2":
        fallback = torch.randn(op.size, generator=generator, dtype=op.dtype)
    else:
        fallback = torch.randint(0, 2, (op.size,), generator=generator).to(op.dtype) * 2 - 1
    base, grad = op.gradient()
    start = torch.where((grad != 0).any(), grad, fallback) if norm == "l2" else torch.where(grad != 0, grad, fallback)
    best_delta = project(ascent_step([start], [w], rho, adaptive=adaptive, eta=eta, norm=norm)[0])
    if steps == 1:
        return max(op.loss(best_delta).item() - base.item(), 0.0)
    best_value, best_grad = op.gradient(best_delta)
    size = 1.0
    for k in range(2, steps + 1):
        step = ascent_step([best_grad], [w], rho, adaptive=adaptive, eta=eta, norm=norm)[0]
        delta = project(best_delta + size * step)
        value, grad = op.gradient(delta) if k < steps else (op.loss(delta), best_grad)
        if value.item() > best_value.item():
            best_delta, best_grad, best_value, size = delta, grad, value, size * 1.5
        else:
            size /= 2
    return max(best_value.item() - base.item(), 0.0)


# ---------------------------------------------------------------------------------------------- tables
def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def measured(
    model: nn.Module, loss_fn: Callable, batches: list, rho: float, steps: int, **kwargs
) -> tuple[float, int, int, float]:
    """``(value, gradients, losses, seconds)`` of ours, the calls counted on the operator."""
    calls = [0, 0]
    with LossOperator(model, loss_fn, batches) as op:
        gradient, loss = op.gradient, op.loss

        def counted_gradient(*args: Tensor) -> tuple[Tensor, Tensor]:
            calls[0] += 1
            return gradient(*args)

        def counted_loss(*args: Tensor) -> Tensor:
            calls[1] += 1
            return loss(*args)

        op.gradient, op.loss = counted_gradient, counted_loss
        start = time.perf_counter()
        result = sharpness_estimate(op, rho, steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)
        seconds = time.perf_counter() - start
    assert (result.num_gradients, result.num_losses) == tuple(calls)
    return result.value, calls[0], calls[1], seconds


def previous(
    model: nn.Module, loss_fn: Callable, batches: list, rho: float, steps: int, norm: str, adaptive: bool, eta: float
) -> float:
    with LossOperator(model, loss_fn, batches) as op:
        return previous_ascent(op, rho, norm, adaptive, eta, steps, seed=0)


def quadratic_section(args: argparse.Namespace) -> None:
    rho, eta = 0.05, 0.1
    rows = []
    worst: dict[str, float] = {}
    cases = []
    for norm, adaptive in (("l2", False), ("l2", True), ("linf", False), ("linf", True)):
        for lam_min in (-0.5, -4.0, -50.0):
            for gradient in ("none", "small", "large", "orthogonal"):
                cases.append((norm, adaptive, "outliers", args.d, lam_min, gradient, args.steps))
    for lam_min, steps in ((-0.5, 20), (-4.0, 20), (-4.0, 40), (-50.0, 20), (-50.0, 60)):
        for gradient in ("none", "small"):
            cases.append(("l2", False, "even", args.d, lam_min, gradient, steps))
    if args.quick:
        cases = [c for c in cases if c[5] in ("none", "small")]
    for norm, adaptive, spectrum, d, lam_min, gradient, steps in cases:
        diagonal = norm == "linf"
        a, g, w = saddle(d, lam_min, gradient, rho, seed=d, diagonal=diagonal, spectrum=spectrum)
        model = Quadratic(a, g, w).float()
        w32 = model.theta.detach().double()
        c = (w32.abs() + eta) if adaptive else torch.ones_like(w32)
        a_u, g_u = c[:, None] * a * c[None, :], c * g
        exact = box_max_diagonal(torch.diagonal(a_u), g_u, rho) if diagonal else trust_region_max(a_u, g_u, rho)
        batches = [torch.zeros(1)]
        ours, grads, losses, _ = measured(
            model, quadratic_loss, batches, rho, steps, norm=norm, adaptive=adaptive, eta=eta
        )
        old = previous(model, quadratic_loss, batches, rho, steps, norm, adaptive, eta)
        error, old_error = (exact - ours) / exact, (exact - old) / exact
        key = f"{norm} {'adaptive' if adaptive else 'plain'} {spectrum}" + (
            f" steps={steps}" if spectrum == "even" else ""
        )
        worst[key] = max(worst.get(key, 0.0), abs(error))
        rows.append(
            [
                norm + (" adaptive" if adaptive else ""),
                f"{spectrum}{' diag' if diagonal else ''}, d={d}",
                f"{lam_min:g}",
                gradient,
                f"{exact:.4e}",
                f"{ours:.4e}",
                f"{100 * error:+.2f}%",
                f"{grads} + {losses}",
                f"{old:.4e}",
                f"{100 * old_error:+.1f}%",
            ]
        )
    header = ["norm", "A", "λ_min", "g", "exact", "ours", "short by", "grads + losses", "previous", "short by"]
    print_table(f"1. Quadratics, float32, ρ = {rho}, η = {eta} (λ_max = 1)", header, rows)
    print("\nLargest |error| of ours per group: " + "; ".join(f"{k}: {100 * v:.2f}%" for k, v in worst.items()))


def box_section(args: argparse.Namespace) -> None:
    rows = []
    for lam_min in (0.1, -0.5, -4.0):
        for scale in (0.0, 0.3, 3.0):
            errors, old_errors = [], []
            for d, seed in itertools.product((4, 6, 8), range(2 if args.quick else 4)):
                gen = torch.Generator().manual_seed(seed)
                inner = lam_min + (1 - lam_min) * torch.rand(d - 2, generator=gen, dtype=torch.float64)
                lam = torch.cat([torch.tensor([1.0, lam_min], dtype=torch.float64), inner])
                q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
                a = (q * lam) @ q.T
                a = 0.5 * (a + a.T)
                g = torch.randn(d, generator=gen, dtype=torch.float64)
                g = g / g.norm() * 0.05 * scale
                model = Quadratic(a, g, torch.zeros(d, dtype=torch.float64))
                exact = box_max_brute_force(a, g, 0.05)
                ours = measured(model, quadratic_loss, [torch.zeros(1)], 0.05, args.steps, norm="linf")[0]
                old = previous(model, quadratic_loss, [torch.zeros(1)], 0.05, args.steps, "linf", False, 0.0)
                errors.append((exact - ours) / exact)
                old_errors.append((exact - old) / exact)
            within = sum(e <= 0.05 for e in errors) / len(errors)
            old_within = sum(e <= 0.05 for e in old_errors) / len(old_errors)
            rows.append(
                [
                    f"{lam_min:g}",
                    f"{scale:g}ρ",
                    str(len(errors)),
                    f"{100 * within:.0f}%",
                    f"{100 * sorted(errors)[len(errors) // 2]:.1f}%",
                    f"{100 * max(errors):.1f}%",
                    f"{100 * old_within:.0f}%",
                    f"{100 * max(old_errors):.1f}%",
                ]
            )
    header = ["λ_min", "‖g‖", "cases", "ours within 5%", "median short", "worst short", "previous within 5%", "worst"]
    print_table(
        "2. ℓ∞ with a non-diagonal Hessian (d = 4, 6, 8, float64) against brute force: a lower bound", header, rows
    )


def mlp_section(args: argparse.Namespace) -> None:
    x, y = digits(512)
    batches = [(x, y)]
    rows = []
    for train_steps in (0, 300):
        torch.manual_seed(0)
        model = digits_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(train_steps):
            opt.zero_grad()
            cross_entropy(model, (x, y)).backward()
            opt.step()
        measures = [
            ("worst_case l2", 0.05, dict(norm="l2")),
            ("worst_case l2", 0.5, dict(norm="l2")),
            ("worst_case l2", 2.0, dict(norm="l2")),
            ("worst_case l2 adaptive", 0.5, dict(norm="l2", adaptive=True)),
            ("worst_case linf", 5e-3, dict(norm="linf")),
            ("keskar", 1e-3, dict(kind="keskar")),
            ("keskar", 5e-3, dict(kind="keskar")),
        ]
        for name, rho, kwargs in measures:
            v20, grads, losses, seconds = measured(model, cross_entropy, batches, rho, 20, **kwargs)
            v100 = measured(model, cross_entropy, batches, rho, 100, **kwargs)[0]
            norm = "linf" if name.startswith("keskar") or "linf" in name else "l2"
            adaptive, eta = (True, 1.0) if name.startswith("keskar") else (kwargs.get("adaptive", False), 0.01)
            scale = 100 / (1 + cross_entropy(model, (x, y)).item()) if name.startswith("keskar") else 1.0
            o20 = scale * previous(model, cross_entropy, batches, rho, 20, norm, adaptive, eta)
            o100 = scale * previous(model, cross_entropy, batches, rho, 100, norm, adaptive, eta)
            rows.append(
                [
                    f"{train_steps}",
                    name,
                    f"{rho:g}",
                    f"{v20:.5g}",
                    f"{v100:.5g}",
                    f"{v20 / v100:.4f}",
                    f"{o20:.5g}",
                    f"{o100:.5g}",
                    f"{o20 / o100:.4f}",
                    f"{grads} + {losses}",
                    f"{1e3 * seconds:.0f} ms",
                ]
            )
    header = ["SGD steps", "measure", "ρ", "ours 20", "ours 100", "20/100", "previous 20", "previous 100", "20/100"]
    header += ["grads + losses (20)", "time (20)"]
    print_table("3. Digits MLP (1,810 parameters, float32, 512 digits): 20 gradients against 100", header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="gradient budget of the quadratic rows (default 20)")
    p.add_argument("--d", type=int, default=200, help="dimension of the quadratics")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--quick", action="store_true", help="fewer rows")
    args = p.parse_args()
    set_threads(args.threads, torch.device("cpu"))
    print(machine_info(torch.device("cpu")))
    start = time.perf_counter()
    quadratic_section(args)
    box_section(args)
    mlp_section(args)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
