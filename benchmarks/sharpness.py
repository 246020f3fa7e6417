#!/usr/bin/env python
"""Benchmark lightning_landscape's sharpness estimators against the published procedures they stand for.

One run, the same models, probe batch and device for every method. Three comparisons:

1. **Keskar's ε-sharpness** ``100·(max L(w+δ) − L(w)) / (1 + L(w))`` over the box ``|δ_i| ≤ ε(|w_i| + 1)``:
   our ``kind="keskar"`` (sign ascent, 20 gradients) against the reference procedure of Keskar et al. (2017),
   ``scipy.optimize.minimize(method="L-BFGS-B", bounds=...)`` on ``−L(w + δ)`` over the flat ``δ``: from
   ``δ = 0`` with 10 iterations (theirs) and with 20 evaluations (our budget), from a random point of the box
   with 10 iterations, and from ``δ = 0`` with ``--long`` iterations. Both are lower bounds of a maximum:
   higher is better; the reference is the best value of any run.
2. **Worst-case ℓ2 sharpness** ``max over ‖δ‖₂ ≤ ρ of L(w+δ) − L(w)``: ours (20 gradients) against SAM's
   one-step ``ε = ρ g/‖g‖`` (``first_step`` of davda54/sam: 1 gradient), projected ascent with a fixed
   normalized step ``2ρ``, and the momentum APGD ascent that Andriushchenko et al. (2023) use
   (tml-epfl/sharpness-vs-generalization: 20 iterations, first step 2ρ, momentum 0.75, step halved at
   APGD's checkpoints; written here from Croce & Hein's 2020 description, each iteration's loss taken from
   its gradient evaluation), all with 20 gradients and one loss. Reference: ``½ρ²λ_max`` from the dense
   Hessian on the least-squares model (exact at its minimum), the best value of ``--long``-step runs on the
   networks. Then a sweep: the fraction of the reference each ascent reaches with 3, 5, 10 and 20 gradients
   at ρ = 0.05, 0.5 and 2.
3. **Average-case ℓ2 sharpness** ``E[L(w+z)] − L(w)``, ``z ~ N(0, ρ²/d·I)``: ours (20 antithetic pairs ±z,
   41 losses) against plain Monte Carlo with the same 41 losses (40 draws), over ``--seeds`` seeds: the
   spread of the estimate (its standard error) and, on the least-squares model, the error against the
   closed form ``½(ρ²/d)·tr(A)``, at its minimum and at ``w = 0`` (the closed form holds at any ``w``).

The peer procedures are written in this file from their papers (a few lines each) and evaluate the loss
with plain ``torch.func.functional_call`` and ``torch.autograd.grad``, independent of our ``LossOperator``.
One installed package also measures sharpness: nngeom (``sam_sharpness``: one SAM step;
``sharpness``: mean loss rise over random directions on the sphere of radius ρ). It is not a project
dependency; install it into a throw-away folder, it is skipped with the reason printed when absent::

    pip install --no-deps --target /tmp/peers_sharp nngeom==0.2.0
    python benchmarks/sharpness.py                # --quick, --device cpu|cuda, --threads N, --models mlp,lsq

Models: a 64-32-10 tanh MLP and a small tanh CNN on scikit-learn's digits (200 full-batch SGD steps,
lr 0.1, momentum 0.9, seed 0; probe batch of 512), and a float64 linear least-squares model on the
standardized pixels (target: the digit) set to its exact minimum, where ``L(w+δ) − L(w) = ½δᵀAδ``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from _bench_models import digits_net, load_digits, loss_fn, machine_info, set_threads, timed, train_sgd
from torch import Tensor, nn
from torch.func import functional_call

from lightning_landscape import functional as LF


# ---------------------------------------------------------------------------------------------- set-up
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="mlp,cnn,lsq", help="comma-separated: mlp, cnn, lsq")
    p.add_argument("--rho", type=float, default=0.05, help="ℓ2 radius (worst and average case)")
    p.add_argument("--radii", default="0.05,0.5,2", help="worst-case radii of the budget sweep")
    p.add_argument("--budgets", default="3,5,10,20", help="gradient budgets of the budget sweep")
    p.add_argument("--keskar-eps", type=float, default=1e-3, help="Keskar's ε (theirs: 1e-3 and 5e-4)")
    p.add_argument("--steps", type=int, default=20, help="gradient budget of every ascent (our default)")
    p.add_argument("--samples", type=int, default=20, help="antithetic pairs of ours (plain MC: twice as many draws)")
    p.add_argument("--seeds", type=int, default=20, help="seeds of the average-case comparison")
    p.add_argument("--long", type=int, default=300, help="iterations of the long reference runs")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers-path", default="/tmp/peers_sharp", help="folder nngeom was pip-installed into")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads; default 1 on a CPU device, 0: torch's own"
    )
    p.add_argument("--no-tf32", action="store_true", help="CUDA: switch TF32 off in cuDNN and matmul (both on here)")
    p.add_argument("--quick", action="store_true", help="mlp and lsq only, 5 seeds, 1 repeat, long runs of 100")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.repeats, args.long = 5, 1, 100
        if args.models == p.get_default("models"):
            args.models = "mlp,lsq"
    return args


@dataclass
class Case:
    """A model at the point measured, its probe batch and loss."""

    name: str
    model: nn.Module
    batch: tuple[Tensor, Tensor]
    loss_fn: Callable[[nn.Module, Any], Tensor]
    info: str
    hessian: Tensor | None = None  # dense float64 Hessian where the loss is exactly quadratic
    extra: dict[str, Any] = field(default_factory=dict)


def trained_net(name: str, x: Tensor, y: Tensor, args: argparse.Namespace) -> Case:
    torch.manual_seed(args.seed)
    model = digits_net(name).to(x.device)
    train_sgd(model, x, y, args.train_steps)
    batch = (x[: args.batch_size], y[: args.batch_size])
    numel = sum(p.numel() for p in model.parameters())
    with LF.LossOperator(model, loss_fn, [batch]) as op:
        base, grad = op.gradient()
    top = LF.hessian_eigenvalues(model, loss_fn, [batch], k=1, tol=1e-6, generator=torch.Generator().manual_seed(0))
    info = (
        f"{numel:,} parameters, float32, {args.train_steps} SGD steps: probe loss {float(base):.4f},"
        f" |g| {float(grad.norm()):.3g}, λ_max {float(top.eigenvalues[0]):.4g} (Lanczos)"
    )
    return Case(name, model, batch, loss_fn, info, extra={"lambda_max": float(top.eigenvalues[0])})


def lsq_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """½·mean squared error of a linear model: ``L(w+δ) − L(w) = ½δᵀAδ + ∇L(w)ᵀδ`` exactly."""
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y).pow(2).mean()


def least_squares(x: Tensor, y: Tensor, args: argparse.Namespace) -> Case:
    """Linear regression of the digit on its standardized pixels, float64, at the exact minimum of the probe loss."""
    xs, ys = x[: args.batch_size].double(), y[: args.batch_size].double()
    xs = (xs - xs.mean(0)) / xs.std(0).clamp_min(1e-3)  # constant pixels become zero columns
    design = torch.cat([xs, torch.ones_like(xs[:, :1])], dim=1)
    solution = torch.linalg.lstsq(design.cpu(), ys.cpu().unsqueeze(1), driver="gelsd").solution.squeeze(1)
    model = nn.Linear(64, 1).double().to(x.device)
    with torch.no_grad():
        model.weight.copy_(solution[:64].unsqueeze(0))
        model.bias.copy_(solution[64:])
    model.eval()
    hessian = (design.T @ design / len(ys)).cpu()
    evals = torch.linalg.eigvalsh(hessian)
    batch = (xs, ys)
    with LF.LossOperator(model, lsq_loss, [batch]) as op:
        base, grad = op.gradient()
    info = (
        f"65 parameters, float64, exact minimum: probe loss {float(base):.4f}, |g| {float(grad.norm()):.1e};"
        f" dense Hessian λ_max {float(evals[-1]):.4f}, λ_2 {float(evals[-2]):.4f}, tr {float(evals.sum()):.4f}"
    )
    return Case("lsq", model, batch, lsq_loss, info, hessian=hessian)


# ---------------------------------------------------------------------------------------------- the peers' loss
class _LossOf(nn.Module):
    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> Tensor:
        return self.fn(self.model, batch)


class Objective:
    """``L(w + δ)`` and its gradient for a flat ``δ`` by plain torch (``functional_call``, ``autograd.grad``),
    independent of our ``LossOperator``; counts the evaluations."""

    def __init__(self, case: Case) -> None:
        named = [(n, p) for n, p in case.model.named_parameters() if p.requires_grad]
        self.wrapper = _LossOf(case.model, case.loss_fn)
        self.names = ["model." + n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.w = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.batch = case.batch
        self.losses = 0
        self.gradients = 0

    def _loss_at(self, flat: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes, strict=True)}
        return functional_call(self.wrapper, params, (self.batch,))

    def loss(self, delta: Tensor | None = None) -> Tensor:
        self.losses += 1
        with torch.no_grad():
            return self._loss_at(self.w if delta is None else self.w + delta)

    def loss_grad(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.gradients += 1
        point = (self.w if delta is None else self.w + delta).detach().requires_grad_(True)
        value = self._loss_at(point)
        (grad,) = torch.autograd.grad(value, point)
        return value.detach(), grad


def project_l2(delta: Tensor, rho: float) -> Tensor:
    size = float(delta.norm())
    return delta if size <= rho else delta * (rho / size)


# ---------------------------------------------------------------------------------------------- peer procedures
def sam_one_step(obj: Objective, rho: float) -> float:
    """davda54/sam ``first_step``: ``ε = ρ·g/(‖g‖ + 1e-12)``; the value is ``L(w + ε) − L(w)``."""
    base, grad = obj.loss_grad()
    eps = grad * (rho / (grad.norm() + 1e-12))
    return float(obj.loss(eps)) - float(base)


def pga_fixed(obj: Objective, rho: float, iterations: int, step: float) -> float:
    """Projected ascent with a fixed normalized step from ``δ = 0``; the best value seen."""
    delta = torch.zeros_like(obj.w)
    base = best = -math.inf
    for k in range(iterations):
        value, grad = obj.loss_grad(delta)
        base = float(value) if k == 0 else base
        best = max(best, float(value))
        delta = project_l2(delta + grad * (step / (grad.norm() + 1e-12)), rho)
    best = max(best, float(obj.loss(delta)))
    return best - base


def apgd_checkpoints(iterations: int) -> set[int]:
    """APGD's checkpoints (Croce & Hein 2020): p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return {math.ceil(q * iterations) for q in p[1:] if math.ceil(q * iterations) <= iterations}


def apgd_l2(obj: Objective, rho: float, iterations: int, alpha: float = 0.75, ratio: float = 0.75) -> float:
    """APGD on the ℓ2 ball as used by Andriushchenko et al. (2023) for worst-case sharpness: normalized gradient
    steps of size η (first 2ρ), momentum ``x_{k+1} = P(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1}))``, and at each
    checkpoint η halves and the iterate returns to the best point when fewer than ``ratio`` of the steps since
    the last checkpoint raised the loss, or when neither η nor the best value changed. ``iterations`` gradients
    and one loss; returns the best value seen."""
    checkpoints = apgd_checkpoints(iterations)
    eta = 2 * rho
    x_prev = x = torch.zeros_like(obj.w)
    value, grad = obj.loss_grad(x)
    base = f_x = float(value)
    best, best_x, best_grad = f_x, x, grad
    rises, last_cp, eta_at_cp, best_at_cp = 0, 0, eta, best
    for k in range(iterations):
        z = project_l2(x + grad * (eta / (grad.norm() + 1e-12)), rho)
        x_new = z if k == 0 else project_l2(x + alpha * (z - x) + (1 - alpha) * (x - x_prev), rho)
        if k < iterations - 1:
            value, grad_new = obj.loss_grad(x_new)
        else:
            value, grad_new = obj.loss(x_new), grad
        f_new = float(value)
        rises += f_new > f_x
        if f_new > best:
            best, best_x, best_grad = f_new, x_new, grad_new
        x_prev, x, f_x, grad = x, x_new, f_new, grad_new
        if k + 1 in checkpoints:
            stalled = rises < ratio * (k + 1 - last_cp) or (eta == eta_at_cp and best == best_at_cp)
            eta_at_cp, best_at_cp, rises, last_cp = eta, best, 0, k + 1
            if stalled:
                eta /= 2
                x_prev = x = best_x
                f_x, grad = best, best_grad
    return best - base


def lbfgsb_keskar(obj: Objective, eps: float, maxiter: int, maxfun: int, start: int | None = None) -> tuple[float, Any]:
    """Keskar et al.'s procedure: L-BFGS-B on ``−L(w + δ)`` over the box ``|δ_i| ≤ ε(|w_i| + 1)``, from ``δ = 0``
    (or, with ``start`` a seed, from a point drawn uniformly in the box)."""
    from scipy.optimize import Bounds, minimize

    w = obj.w.double().cpu().numpy()
    bound = eps * (np.abs(w) + 1.0)
    x0 = np.zeros_like(w) if start is None else np.random.default_rng(start).uniform(-bound, bound)
    base = float(obj.loss()) if start is not None else None
    values: list[float] = []

    def fun(d: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = obj.loss_grad(torch.as_tensor(d, dtype=obj.w.dtype, device=obj.w.device))
        values.append(float(value))
        return -float(value), -grad.double().cpu().numpy()

    res = minimize(
        fun,
        x0,
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(-bound, bound),
        options={"maxiter": maxiter, "maxfun": maxfun},
    )
    base = values[0] if base is None else base  # from δ = 0 the first evaluation is L(w)
    return 100.0 * (max(-float(res.fun), base) - base) / (1.0 + base), res


def plain_mc(obj: Objective, rho: float, draws: int, seed: int) -> float:
    """Plain Monte Carlo: ``mean L(w + z_i) − L(w)`` over ``draws`` independent ``z ~ N(0, ρ²/d·I)``."""
    gen = torch.Generator().manual_seed(seed)
    d = obj.w.numel()
    base = float(obj.loss())
    total = 0.0
    for _ in range(draws):
        z = torch.randn(d, generator=gen, dtype=obj.w.dtype).to(obj.w.device) * (rho / math.sqrt(d))
        total += float(obj.loss(z))
    return total / draws - base


# ---------------------------------------------------------------------------------------------- ours
def ours(case: Case, rho: float, **kwargs: Any) -> LF.SharpnessResult:
    with LF.LossOperator(case.model, case.loss_fn, [case.batch]) as op:
        return LF.sharpness_estimate(op, rho, **kwargs)


# ---------------------------------------------------------------------------------------------- nngeom
class NNGeom:
    """nngeom, if it can be imported (from ``--peers-path`` or the environment)."""

    def __init__(self, path: str) -> None:
        if path and os.path.isdir(path) and path not in sys.path:
            sys.path.insert(0, path)
        self.mod: Any = None
        self.status = ""
        try:
            self.mod = importlib.import_module("nngeom")
            self.status = f"nngeom {importlib.metadata.version('nngeom')}"
        except Exception as err:
            self.status = f"nngeom skipped ({type(err).__name__}: {err})"

    def model(self, case: Case) -> Any:
        """nngeom writes the weights in place (and restores them): give it a copy."""
        return self.mod.Model(copy.deepcopy(case.model).eval(), loss_fn=case.loss_fn)


# ---------------------------------------------------------------------------------------------- timing, output
def counted(case: Case, fn: Callable[[Objective], Any], device: torch.device, repeats: int) -> tuple[Any, str, float]:
    """Run a peer on a fresh ``Objective``: ``(result, "gradients + losses", median seconds)``."""
    box: list[Objective] = []

    def run() -> Any:
        box.clear()
        box.append(Objective(case))
        return fn(box[0])

    out, seconds = timed(run, device, repeats)
    return out, f"{box[0].gradients} + {box[0].losses}", seconds


def within_budget(found: list[tuple[str, float, str, str]], n_peers: int) -> tuple[str, float, str, str]:
    """The best of the peer rows ``found[1:n_peers]`` that spent no more evaluations than ours (``found[0]``)."""

    def total(evals: str) -> int:
        return sum(int(part) for part in evals.split("+"))

    rows = [f for f in found[1:n_peers] if total(f[2]) <= total(found[0][2])]
    return max(rows, key=lambda f: f[1]) if rows else ("none", math.nan, "-", "-")


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def print_table(title: str, header: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for note in notes:
        print(note)


# ---------------------------------------------------------------------------------------------- sections
def keskar_section(cases: list[Case], args: argparse.Namespace, device: torch.device, summary: list) -> None:
    eps, steps, reps = args.keskar_eps, args.steps, args.repeats
    rows: list[list[str]] = []
    notes: list[str] = []
    for case in cases:
        found: list[tuple[str, float, str, str]] = []
        r, t = timed(lambda case=case: ours(case, eps, kind="keskar", steps=steps), device, reps)
        found.append((f"ours keskar, steps={steps}", r.value, f"{r.num_gradients} + {r.num_losses}", ms(t)))
        runs = [
            ("L-BFGS-B from δ=0, 10 iterations (Keskar)", 10, 15000, None),
            (f"L-BFGS-B from δ=0, {steps} evaluations", 15000, steps, None),
            ("L-BFGS-B from a random point, 10 iterations", 10, 15000, args.seed),
        ]
        for label, maxiter, maxfun, start in runs:
            (value, res), evals, t = counted(
                case, lambda o, a=maxiter, b=maxfun, c=start: lbfgsb_keskar(o, eps, a, b, c), device, reps
            )
            found.append((label, value, evals, ms(t)))
            if res.status == 2:  # ABNORMAL: usually the line search in float32
                notes.append(f"{case.name}, {label}: scipy stopped with '{res.message}'.")
        n_peers = len(found)
        (long_value, res), evals, t = counted(case, lambda o: lbfgsb_keskar(o, eps, args.long, 15000), device, 1)
        found.append((f"L-BFGS-B from δ=0, {args.long} iterations", long_value, evals, ms(t)))
        notes.append(f"{case.name}: L-BFGS-B given {args.long} iterations stopped after {evals}: {res.message}")
        r_long = ours(case, eps, kind="keskar", steps=args.long)
        found.append((f"ours keskar, steps={args.long}", r_long.value, f"{r_long.num_gradients} + 1", "-"))
        best = max(v for _, v, _, _ in found)
        for label, value, evals, tm in found:
            rows.append([case.name, label, f"{value:.6g}", f"{value / best:.4f}", evals, tm])
        peer = within_budget(found, n_peers)
        summary.append(
            [
                f"Keskar ε={eps:g}",
                case.name,
                f"{found[0][1]:.4g} ({found[0][1] / best:.3f}), {found[0][2]}, {found[0][3]}",
                f"{peer[0]}: {peer[1]:.4g} ({peer[1] / best:.3f}), {peer[2]}, {peer[3]}",
                f"{found[0][1] / peer[1]:.3f}" if peer[1] > 0 else "peer 0",
            ]
        )
    notes.append(
        "value: 100·(max L(w+δ) − L(w))/(1 + L(w)), higher is better (both are lower bounds of the maximum);"
        " x best: fraction of the best value of any row. evaluations: gradients + loss-only; one L-BFGS-B"
        " evaluation is a loss and its gradient. time: median of the repeats."
    )
    print_table(
        f"Keskar ε-sharpness, ε = {eps:g}",
        ["model", "method", "value", "x best", "gradients + losses", "time"],
        rows,
        notes,
    )


def worst_case_section(
    cases: list[Case], rho: float, args: argparse.Namespace, device: torch.device, peer: NNGeom, summary: list
) -> None:
    steps, reps = args.steps, args.repeats
    rows: list[list[str]] = []
    notes: list[str] = []
    for case in cases:
        found: list[tuple[str, float, str, str]] = []
        r, t = timed(lambda case=case: ours(case, rho, steps=steps), device, reps)
        found.append((f"ours worst_case, steps={steps}", r.value, f"{r.num_gradients} + {r.num_losses}", ms(t)))
        peers = [
            ("SAM one step (davda54 first_step)", lambda o: sam_one_step(o, rho)),
            (f"PGA, fixed step 2ρ, {steps} iterations", lambda o: pga_fixed(o, rho, steps, 2 * rho)),
            (f"m-APGD (Andriushchenko et al.), {steps} iterations", lambda o: apgd_l2(o, rho, steps)),
        ]
        for label, fn in peers:
            value, evals, t = counted(case, fn, device, reps)
            found.append((label, value, evals, ms(t)))
        if peer.mod is not None:
            try:
                out, t = timed(
                    lambda case=case: peer.mod.sam_sharpness(peer.model(case), case.batch, rho=rho, relative=False),
                    device,
                    reps,
                )
                found.append(("nngeom sam_sharpness(relative=False)", out["adversarial_rise"], "1 + 2", ms(t)))
            except Exception as err:
                notes.append(f"{case.name}: nngeom sam_sharpness failed: {type(err).__name__}: {err}")
        n_peers = len(found)
        long_runs = [
            (f"ours worst_case, steps={args.long}", ours(case, rho, steps=args.long).value),
            (f"m-APGD, {args.long} iterations", counted(case, lambda o: apgd_l2(o, rho, args.long), device, 1)[0]),
        ]
        for label, value in long_runs:
            found.append((label, value, f"{args.long} + 1", "-"))
        if case.hessian is not None:
            exact = 0.5 * rho**2 * float(torch.linalg.eigvalsh(case.hessian)[-1])
            ref, ref_text = exact, f"½ρ²λ_max = {exact:.6g} (dense Hessian, exact)"
        else:
            ref = max(v for _, v, _, _ in found)
            quad = 0.5 * rho**2 * case.extra["lambda_max"]
            ref_text = f"best of all rows = {ref:.6g} (½ρ²λ_max = {quad:.4g} for scale)"
        for label, value, evals, tm in found:
            rows.append([case.name, label, f"{value:.6g}", f"{value / ref:.4f}", evals, tm])
        rows.append([case.name, "reference: " + ref_text, "", "", "", ""])
        best_peer = within_budget(found, n_peers)
        summary.append(
            [
                f"worst-case ℓ2 ρ={rho:g}",
                case.name,
                f"{found[0][1]:.4g} ({found[0][1] / ref:.3f}), {found[0][2]}, {found[0][3]}",
                f"{best_peer[0]}: {best_peer[1]:.4g} ({best_peer[1] / ref:.3f}), {best_peer[2]}, {best_peer[3]}",
                f"{found[0][1] / best_peer[1]:.3f}" if best_peer[1] > 0 else "peer 0",
            ]
        )
    notes.append(
        "value: max L(w+δ) − L(w) reached, higher is better; x ref: fraction of the reference row."
        " gradients + losses: evaluations over the probe batch; time: median of the repeats."
    )
    print_table(
        f"Worst-case ℓ2 sharpness, ρ = {rho:g}",
        ["model", "method", "value", "x ref", "gradients + losses", "time"],
        rows,
        notes,
    )


def budget_section(cases: list[Case], args: argparse.Namespace, device: torch.device, summary: list) -> None:
    """Fraction of the reference each ascent reaches with ``k`` gradients (+ 1 loss), for several radii."""
    budgets = [int(b) for b in args.budgets.split(",")]
    radii = [float(r) for r in args.radii.split(",")]
    rows: list[list[str]] = []
    for case in cases:
        # on the least-squares model at its minimum every fraction is the same for every ρ (a quadratic)
        for rho in radii if case.hessian is None else radii[:1]:
            methods: dict[str, Callable[[int], float]] = {
                "ours": lambda k, case=case, rho=rho: ours(case, rho, steps=k).value,
                "PGA, fixed step 2ρ": lambda k, case=case, rho=rho: pga_fixed(Objective(case), rho, k, 2 * rho),
                "m-APGD": lambda k, case=case, rho=rho: apgd_l2(Objective(case), rho, k),
            }
            if case.hessian is not None:
                ref = 0.5 * rho**2 * float(torch.linalg.eigvalsh(case.hessian)[-1])
                ref_text = "½ρ²λ_max"
            else:
                ref = max(methods["ours"](args.long), methods["m-APGD"](args.long))
                ref_text = f"best of {args.long}-step runs"
            fractions: dict[str, list[float]] = {}
            for name, fn in methods.items():
                fractions[name] = [fn(k) / ref for k in budgets]
                rows.append([case.name, f"{rho:g}", name, *(f"{f:.4f}" for f in fractions[name])])
            sam = sam_one_step(Objective(case), rho) / ref
            rows.append(
                [case.name, f"{rho:g}", f"SAM one step (1 gradient); ref: {ref_text} = {ref:.4g}", f"{sam:.4f}"]
            )
            rows[-1] += [""] * (len(budgets) - 1)
            if rho != args.rho and args.steps in budgets:
                i = budgets.index(args.steps)
                peer = max(("PGA, fixed step 2ρ", "m-APGD"), key=lambda n: fractions[n][i])
                summary.append(
                    [
                        f"worst-case ℓ2 ρ={rho:g}",
                        case.name,
                        f"x ref {fractions['ours'][i]:.4f}, {args.steps} + 1",
                        f"{peer}: x ref {fractions[peer][i]:.4f}, {args.steps} + 1",
                        f"{fractions['ours'][i] / fractions[peer][i]:.3f}",
                    ]
                )
    print_table(
        "Worst-case ℓ2: fraction of the reference reached with k gradients (+ 1 loss)",
        ["model", "ρ", "method", *(f"k = {k}" for k in budgets)],
        rows,
        ["The least-squares model at its minimum is a quadratic: its fractions do not depend on ρ (one ρ shown)."],
    )


def average_case_section(
    cases: list[Case], args: argparse.Namespace, device: torch.device, peer: NNGeom, summary: list
) -> None:
    rho, samples = args.rho, args.samples
    seeds = range(args.seed, args.seed + args.seeds)
    points: list[tuple[str, Case]] = []
    for case in cases:
        if case.hessian is None:
            points.append((case.name, case))
        else:
            points.append((f"{case.name} at its minimum", case))
            zero = copy.deepcopy(case.model)
            with torch.no_grad():
                for p in zero.parameters():
                    p.zero_()
            points.append((f"{case.name} at w = 0", Case(case.name, zero, case.batch, case.loss_fn, "", case.hessian)))
    rows: list[list[str]] = []
    for label, case in points:
        exact = None
        if case.hessian is not None:
            exact = 0.5 * rho**2 / case.hessian.shape[0] * float(case.hessian.diagonal().sum())
        estimators: list[tuple[str, Callable[[int], float], str]] = [
            (
                f"ours average_case, samples={samples} (±z)",
                lambda s, case=case: (
                    ours(
                        case, rho, kind="average_case", samples=samples, generator=torch.Generator().manual_seed(s)
                    ).value
                ),
                f"{2 * samples + 1}",
            ),
            (
                f"plain Monte Carlo, {2 * samples} draws",
                lambda s, case=case: plain_mc(Objective(case), rho, 2 * samples, s),
                f"{2 * samples + 1}",
            ),
        ]
        if peer.mod is not None:
            estimators.append(
                (
                    f"nngeom sharpness(n_samples={2 * samples}), sphere",
                    lambda s, case=case: peer.mod.sharpness(
                        peer.model(case), case.batch, radius=rho, n_samples=2 * samples, seed=s, relative=False
                    )["mean_rise"],
                    f"{2 * samples + 1}",
                )
            )
        spread: dict[str, float] = {}
        for name, fn, losses in estimators:
            t0 = time.perf_counter()
            values = [fn(s) for s in seeds]
            t = (time.perf_counter() - t0) / len(values)
            mean, sd = statistics.mean(values), statistics.stdev(values)
            spread[name] = sd
            if exact is not None:
                rmse = math.sqrt(statistics.mean([(v - exact) ** 2 for v in values]))
                err = f"{(mean - exact) / exact:+.2%} / {rmse / exact:.2%}"
            else:
                err = "-"
            ratio = sd / spread[estimators[0][0]]
            rows.append([label, name, f"{mean:.4g}", f"{sd:.2g}", f"{ratio:.2f}", err, losses, ms(t)])
        if exact is not None:
            rows.append([label, f"exact ½(ρ²/d)·tr(A) = {exact:.6g}", "", "", "", "", "", ""])
        sd_ours = spread[estimators[0][0]]
        rival = min((e[0] for e in estimators[1:]), key=lambda name: spread[name])  # the least noisy peer
        summary.append(
            [
                f"average-case ℓ2 ρ={rho:g}",
                label,
                f"SE {sd_ours:.2g}, {2 * samples + 1} losses",
                f"{rival}: SE {spread[rival]:.2g}, {2 * samples + 1} losses",
                f"{spread[rival] / sd_ours:.2f} (SE peer / ours; variance {(spread[rival] / sd_ours) ** 2:.3g}x)",
            ]
        )
    print_table(
        f"Average-case ℓ2 sharpness, ρ = {rho:g}, {args.seeds} seeds",
        ["point", "estimator", "mean", "SE (sd over seeds)", "SE / ours", "bias / RMSE vs exact", "losses", "time"],
        rows,
        [
            "SE: standard deviation of one estimate over the seeds; SE / ours > 1: ours is less noisy at the same"
            " number of loss evaluations. bias: (mean over seeds − exact)/exact; RMSE: of one estimate, /exact.",
            "nngeom draws z on the sphere ‖z‖ = ρ (E‖z‖² = ρ², the same mean on a quadratic, a different law).",
        ],
    )


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    set_threads(args.threads, device)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    peer = NNGeom(args.peers_path)
    print("# benchmarks/sharpness.py: lightning_landscape sharpness vs Keskar's L-BFGS-B, SAM, APGD, plain MC")
    print(machine_info(device))
    print(f"peers: scipy {importlib.metadata.version('scipy')} (L-BFGS-B); {peer.status}")
    t_start = time.perf_counter()
    x, y = load_digits(device, args.seed)
    cases: list[Case] = []
    for name in args.models.split(","):
        name = name.strip()
        if name in ("mlp", "cnn"):
            cases.append(trained_net(name, x, y, args))
        elif name == "lsq":
            cases.append(least_squares(x, y, args))
        else:
            raise SystemExit(f"unknown model {name!r} (mlp, cnn, lsq)")
    for case in cases:
        print(f"model {case.name}: {case.info}; probe batch {len(case.batch[0])}")

    summary: list[list[str]] = []
    keskar_section(cases, args, device, summary)
    worst_case_section(cases, args.rho, args, device, peer, summary)
    budget_section(cases, args, device, summary)
    average_case_section(cases, args, device, peer, summary)

    print_table(
        "Summary: ours against the best peer at the same or a smaller budget",
        ["measure", "model", "ours: value (x ref), gradients + losses, time", "best peer", "ours / peer"],
        summary,
        [
            "ours / peer > 1: ours reached more (worst case, Keskar) or was less noisy (average case); the peer is the"
            " best of the rows above that spent at most our evaluations.",
            f"\ntotal benchmark time {time.perf_counter() - t_start:.1f} s",
        ],
    )


if __name__ == "__main__":
    main()
