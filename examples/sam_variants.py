"""SAMMixin's variants side by side: plain, SAM, ASAM, SAM every 5th step, LookSAM and SAM-ON, on two tasks.

    python examples/sam_variants.py                        # 3 seeds, both tasks: 5-7 min on one CPU core
    python examples/sam_variants.py --tasks digits --seeds 5 --variants plain,sam,samon
    python examples/sam_variants.py --rho-sweep 0.01,0.05,0.2,0.5,1   # what sam_log shows at each ρ (digits)
    python examples/sam_variants.py --fast                 # ~15 s (the CI smoke test)

Tasks (each from the example that owns it; nothing is copied):

- ``digits``: the quickstart's small CNN (two conv layers with BatchNorm) on scikit-learn's bundled digits, 1,400
  for training with 20% of their labels flipped to another class, the other 397 for validation with clean labels
  (``examples/quickstart.py``: SGD, momentum 0.9, lr 0.01, batch 32). Label noise is where SAM is known to help
  most (Foret et al. 2021, their label-noise experiments). Test error: the validation error on the clean labels.
- ``device``: the small-data transistor model of ``examples/device_modeling.py`` (40 noisy bias points of an EKV
  MOSFET, Adam with cosine annealing, batch 10), with a LayerNorm after each hidden layer so that SAM-ON has
  something to perturb (every variant trains this same model). Test error: the RMS error of log10 I_D against the
  noise-free model on the 20 x 20 test grid, in decades.

Variants (``SAMMixin`` settings; ρ is the task's SAM radius, not tuned per variant):

=========  ====================================================  ===========================================
plain      ``sam=False``                                          the optimizer alone
sam        ``sam=True, sam_rho=ρ``                                Foret et al. 2021
asam       ``sam_adaptive=True, sam_rho=10ρ``                     Kwon et al. 2021 (ρ 10x SAM's)
every5     ``sam_every_n_steps=5``                                SAM on every 5th step, plain steps between
looksam    ``sam_every_n_steps=5, sam_reuse=True``                Liu et al. 2022 (α = 0.7)
samon      ``sam_params="norm"``                                  Mueller et al. 2023: only normalization layers
=========  ====================================================  ===========================================

Per task and variant, over ``--seeds`` seeds (a seed fixes the initial weights and batch order, for digits also the
split and which labels are flipped; every variant of a seed starts from the same weights): the test error (mean ±
std), the top Hessian eigenvalue λ1 and the worst-case ℓ2 sharpness (ρ = 0.05, 20 ascent steps) of the final
weights on a fixed probe (digits: the first 512 training samples, flipped labels included; device: the 40
training points), in eval mode; the SAM steps each run made (counted by a callback, not assumed), the wall time of
a whole run and the time per training step relative to plain's in the same seed (median SAM and plain step
times, weighted by their counts: robust to bursts of other work on the machine). Then a reading: which variants
beat plain by more than the seed spread (mean error lower by more than the larger of the two standard
deviations), which are worse by that much, and which stay within it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pytorch_lightning as pl
import torch
from device_modeling import DeviceMLP, make_data, mse
from quickstart import DigitsCNN, cross_entropy, digits_loaders, fit_measures
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import functional as LF

VARIANTS = ["plain", "sam", "asam", "every5", "looksam", "samon"]
TASKS = ["digits", "device"]
SHARPNESS_RHO = 0.05  # the post-hoc worst-case sharpness radius, the same for every run of a task


def variant_settings(variant: str, rho: float) -> dict:
    """The ``SAMMixin`` keywords of ``variant`` at the task's SAM radius ``rho``.

    Example:
        >>> variant_settings("looksam", 0.05)
        {'sam': True, 'sam_rho': 0.05, 'sam_every_n_steps': 5, 'sam_reuse': True}
        >>> variant_settings("asam", 0.05)["sam_rho"]
        0.5
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
    if variant == "plain":
        return {"sam": False}
    extra = {
        "sam": {},
        "asam": {"sam_adaptive": True, "sam_rho": 10 * rho},
        "every5": {"sam_every_n_steps": 5},
        "looksam": {"sam_every_n_steps": 5, "sam_reuse": True},
        "samon": {"sam_params": "norm"},
    }[variant]
    return {"sam": True, "sam_rho": rho, **extra}


class DeviceNormMLP(DeviceMLP):
    """``device_modeling``'s MLP (its training step, Adam and cosine schedule) with a LayerNorm after each hidden
    linear layer: 2 → hidden → LN → SiLU → hidden → LN → SiLU → 1.

    Example:
        >>> from lightning_landscape._sam_variants import ParamSelection
        >>> ParamSelection("norm").names(DeviceNormMLP(hidden=8))  # what SAM-ON perturbs
        ['net.1.weight', 'net.1.bias', 'net.4.weight', 'net.4.bias']
    """

    def __init__(self, hidden: int = 64, lr: float = 1e-2, epochs: int = 40, **kwargs) -> None:
        super().__init__(hidden=hidden, lr=lr, epochs=epochs, **kwargs)
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.LayerNorm(hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, 1),
        )  # fmt: skip


class StepSpy(pl.Callback):
    """What a run really did: optimizer steps, SAM steps (second passes at w + ε, seen through ``sam_perturbed``),
    how many parameters had a gradient after the first pass of the first SAM step (all, or SAM-ON's norm layers
    only), and each step's wall time (``on_train_batch_start`` to ``on_train_batch_end``), split into SAM and
    plain steps.

    :attr:`step_seconds` is robust to other work on the machine: the median time of a SAM step and of a plain step,
    averaged with the run's share of each (a burst of load moves a mean, not a median).

    Example:
        >>> spy = StepSpy()
        >>> spy.times = {True: [2.0, 2.1, 9.0], False: [1.0, 1.0, 1.1, 1.0, 1.0, 1.0, 8.0]}
        >>> round(spy.step_seconds, 3)  # 0.3 * 2.1 + 0.7 * 1.0
        1.33
    """

    def __init__(self) -> None:
        self.sam_steps = 0
        self.first_pass_grads: int | None = None
        self.times: dict[bool, list[float]] = {True: [], False: []}  # SAM step? -> seconds per step
        self._first_pass: int | None = None
        self._start = 0.0
        self._sam_before = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start, self._sam_before = time.perf_counter(), self.sam_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times[self.sam_steps > self._sam_before].append(time.perf_counter() - self._start)

    def on_after_backward(self, trainer, pl_module) -> None:
        with_grad = sum(p.grad is not None for p in pl_module.parameters())
        if pl_module.sam_perturbed:
            self.sam_steps += 1
            if self.first_pass_grads is None:
                self.first_pass_grads = self._first_pass
        else:
            self._first_pass = with_grad

    @property
    def step_seconds(self) -> float:
        """Seconds per step: the median SAM step and the median plain step, weighted by their counts."""
        counts = {kind: len(t) for kind, t in self.times.items()}
        total = sum(counts.values())
        return sum(statistics.median(t) * counts[kind] / total for kind, t in self.times.items() if t)


def _trainer(epochs: int, spy: StepSpy) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=[spy], enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
    )  # fmt: skip


def curvature(model: nn.Module, loss_fn, probe: tuple[Tensor, Tensor], fast: bool) -> dict[str, float]:
    """λ1 (Lanczos) and worst-case ℓ2 sharpness at ``SHARPNESS_RHO`` on ``probe``, each from a fixed generator."""
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    eig = LF.hessian_eigenvalues(model, loss_fn, [probe], k=1, max_hvps=20 if fast else 100, generator=gen())
    worst = LF.sharpness(model, loss_fn, [probe], rho=SHARPNESS_RHO, steps=5 if fast else 20, generator=gen())
    return {"eigenvalue_1": float(eig.eigenvalues[0]), "worst_case": float(worst)}


def run_digits(variant: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """One digits run: the quickstart's CNN and data, 20% of the training labels flipped."""
    pl.seed_everything(seed, verbose=False)
    train, val = digits_loaders(args.digits_n_train, batch_size=32, seed=seed, label_noise=0.2)
    model = DigitsCNN(lr=0.01, **variant_settings(variant, args.digits_rho))
    spy = StepSpy()
    trainer = _trainer(args.digits_epochs, spy)
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    measured = fit_measures(model, train.dataset, val.dataset)
    probe = tuple(t[: args.digits_probe] for t in train.dataset.tensors)
    return run_result(1 - measured["val_acc"], curvature(model, cross_entropy, probe, args.fast), trainer, spy,
                      model, seconds)  # fmt: skip


def run_device(variant: str, seed: int, args: argparse.Namespace, data: dict[str, Tensor]) -> dict[str, float]:
    """One device-modelling run: ``device_modeling``'s data and training, the LayerNorm MLP."""
    pl.seed_everything(seed, verbose=False)
    model = DeviceNormMLP(lr=1e-2, epochs=args.device_epochs, **variant_settings(variant, args.device_rho))
    x, y = data["x_train"], data["y_train"]
    loader = DataLoader(TensorDataset(x.repeat(args.device_repeats, 1), y.repeat(args.device_repeats, 1)),
                        batch_size=10, shuffle=True)  # fmt: skip
    spy = StepSpy()
    trainer = _trainer(args.device_epochs, spy)
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        log_pred = model(data["x_test"]).double().squeeze(1) * data["std"] + data["mean"]
    test_error = float((log_pred - data["log_true_test"]).pow(2).mean().sqrt())
    return run_result(test_error, curvature(model, mse, (x, y), args.fast), trainer, spy, model, seconds)


def run_result(
    test_error: float, measured: dict[str, float], trainer: pl.Trainer, spy: StepSpy, model: nn.Module, seconds: float
) -> dict[str, float]:
    """One run's row: its test error, curvature, the steps it took (SAM steps counted by the spy) and its time."""
    return {
        "test_error": test_error,
        **measured,
        "steps": trainer.global_step,
        "sam_steps": spy.sam_steps,
        "first_pass_grads": math.nan if spy.first_pass_grads is None else spy.first_pass_grads,
        "parameters": len(list(model.parameters())),
        "seconds": seconds,
        "step_seconds": spy.step_seconds,
    }


def summarize(per_seed: list[dict[str, float]], plain: list[dict[str, float]]) -> dict[str, float]:
    """Mean and std over seeds (std 0 for one seed) of the measures, the run's counts (from the first seed) and the
    step time relative to plain's in the same seed (mean of the per-seed ratios).

    Example:
        >>> runs = [{"test_error": 0.1, "step_seconds": 2.0}, {"test_error": 0.3, "step_seconds": 2.0}]
        >>> plain = [{"test_error": 0.2, "step_seconds": 1.0}, {"test_error": 0.2, "step_seconds": 1.0}]
        >>> s = summarize(runs, plain)
        >>> round(s["test_error_mean"], 3), round(s["test_error_std"], 4), s["step_ratio"]
        (0.2, 0.1414, 2.0)
    """
    out: dict[str, float] = {}
    for key in ("test_error", "eigenvalue_1", "worst_case", "seconds"):
        if key in per_seed[0]:
            values = [m[key] for m in per_seed]
            out[f"{key}_mean"] = statistics.fmean(values)
            out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for key in ("steps", "sam_steps", "first_pass_grads", "parameters"):
        if key in per_seed[0]:
            out[key] = float(per_seed[0][key])
    ratios = [m["step_seconds"] / p["step_seconds"] for m, p in zip(per_seed, plain, strict=True)]
    out["step_ratio"] = statistics.fmean(ratios)
    return out


def verdict(results: dict[str, float], task: str, variant: str, seeds: int, key: str = "test_error") -> str:
    """``"better"`` / ``"worse"`` when ``variant``'s mean ``key`` is below / above plain's by more than the larger
    of the two standard deviations over seeds, ``"within"`` otherwise, ``"one seed"`` when there is no spread.

    Example:
        >>> r = {"t/plain/test_error_mean": 0.10, "t/plain/test_error_std": 0.01,
        ...      "t/sam/test_error_mean": 0.07, "t/sam/test_error_std": 0.02}
        >>> verdict(r, "t", "sam", 3), verdict(r, "t", "sam", 1)
        ('better', 'one seed')
    """
    if seeds < 2:
        return "one seed"
    diff = results[f"{task}/{variant}/{key}_mean"] - results[f"{task}/plain/{key}_mean"]
    spread = max(results[f"{task}/{variant}/{key}_std"], results[f"{task}/plain/{key}_std"])
    if abs(diff) <= spread:
        return "within"
    return "better" if diff < 0 else "worse"


#: (header, how a row's cell is made from the results of ``task/variant/``)
COLUMNS = [
    ("test error", lambda r, p: f"{r[p + 'test_error_mean']:.4f} ± {r[p + 'test_error_std']:.4f}"),
    ("λ1", lambda r, p: f"{r[p + 'eigenvalue_1_mean']:.3g} ± {r[p + 'eigenvalue_1_std']:.2g}"),
    ("worst-case sharpness", lambda r, p: f"{r[p + 'worst_case_mean']:.3g} ± {r[p + 'worst_case_std']:.2g}"),
    ("SAM steps / steps", lambda r, p: f"{r[p + 'sam_steps']:.0f} / {r[p + 'steps']:.0f}"),
    ("s per run", lambda r, p: f"{r[p + 'seconds_mean']:.2f}"),
    ("step time vs plain", lambda r, p: f"{r[p + 'step_ratio']:.2f}x"),
]


def table(results: dict[str, float], tasks: list[str], variants: list[str], rhos: dict[str, float]) -> list[str]:
    """The markdown table: one row per task and variant.

    Example:
        >>> r = {"t/sam/test_error_mean": 0.05, "t/sam/test_error_std": 0.01, "t/sam/eigenvalue_1_mean": 18.0,
        ...      "t/sam/eigenvalue_1_std": 0.9, "t/sam/worst_case_mean": 0.076, "t/sam/worst_case_std": 0.012,
        ...      "t/sam/sam_steps": 880, "t/sam/steps": 880, "t/sam/seconds_mean": 8.4, "t/sam/step_ratio": 1.9}
        >>> print(table(r, ["t"], ["sam"], {"t": 0.05})[-1])
        | t | sam | 0.05 | 0.0500 ± 0.0100 | 18 ± 0.9 | 0.076 ± 0.012 | 880 / 880 | 8.40 | 1.90x |
    """
    lines = [
        "| task | variant | ρ | " + " | ".join(h for h, _ in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for task in tasks:
        for variant in variants:
            rho = variant_settings(variant, rhos[task]).get("sam_rho")
            cells = [task, variant, "–" if rho is None else f"{rho:g}"]
            cells += [cell(results, f"{task}/{variant}/") for _, cell in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def reading(results: dict[str, float], tasks: list[str], variants: list[str], seeds: int) -> list[str]:
    """What the numbers say, per task: which variants beat plain's test error beyond the seed spread, which are
    worse, which are within it; and, for each, whether it lowered λ1 beyond the spread and what it cost."""
    lines = []
    for task in tasks:
        others = [v for v in variants if v != "plain"]
        if not others:
            continue
        by = {v: verdict(results, task, v, seeds) for v in others}
        p = f"{task}/plain/"
        lines.append(
            f"{task} (plain: test error {results[p + 'test_error_mean']:.4f} ± {results[p + 'test_error_std']:.4f}, "
            f"λ1 {results[p + 'eigenvalue_1_mean']:.3g}):"
        )
        for v in others:
            q = f"{task}/{v}/"
            diff = results[q + "test_error_mean"] - results[p + "test_error_mean"]
            spread = max(results[q + "test_error_std"], results[p + "test_error_std"])
            flat = verdict(results, task, v, seeds, key="eigenvalue_1")
            flat_text = {"better": "lower λ1", "worse": "HIGHER λ1", "within": "λ1 within the spread"}.get(flat, "")
            text = {
                "better": "beats plain",
                "worse": "WORSE than plain",
                "within": "does not help here (within the seed spread)",
                "one seed": "not judged (one seed, no spread)",
            }[by[v]]
            lines.append(
                f"- {v}: {text}: test error {diff:+.4f} vs spread {spread:.4f}"
                + (f"; {flat_text} ({results[q + 'eigenvalue_1_mean']:.3g})" if flat_text else "")
                + f"; {results[q + 'step_ratio']:.2f}x plain's step time"
            )
        for name, key in (("Beat plain", "better"), ("Worse than plain", "worse"), ("Within the spread", "within")):
            chosen = [v for v in others if by[v] == key]
            lines.append(f"  {name}: {', '.join(chosen) or 'none'}.")
    return lines


class SAMLogRecorder(pl.Callback):
    """Per SAM step, what ``sam_log`` logged: ``(L(w), sam/sharpness, sam/grad_norm, sam/rho)``."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        if "sam/sharpness" in m:
            self.steps.append(
                (float(outputs["loss"]), *(float(m[k]) for k in ("sam/sharpness", "sam/grad_norm", "sam/rho")))
            )


def rho_sweep(rhos: list[float], args: argparse.Namespace) -> dict[str, float]:
    """SAM on digits (seed 0) at each ``ρ`` with ``sam_log=True``: the median over the first and the last epoch's
    steps of ``sam/sharpness / (ρ · sam/grad_norm)`` (1: the loss rises by the first-order amount, the curvature is
    not seen; above 1: it is), the last epoch's median ``L(w)`` and ``sam/sharpness / L(w)``, and the final
    validation error."""
    out: dict[str, float] = {}
    for rho in rhos:
        pl.seed_everything(0, verbose=False)
        train, val = digits_loaders(args.digits_n_train, batch_size=32, seed=0, label_noise=0.2)
        model = DigitsCNN(lr=0.01, sam=True, sam_rho=rho, sam_log=True)
        recorder = SAMLogRecorder()
        trainer = _trainer(args.digits_epochs, StepSpy())
        trainer.callbacks.append(recorder)
        trainer.fit(model, train)
        per_epoch = len(train)
        first, last = recorder.steps[:per_epoch], recorder.steps[-per_epoch:]
        out[f"{rho:g}/first_order_ratio_first_epoch"] = statistics.median(s / (r * g) for _, s, g, r in first)
        out[f"{rho:g}/first_order_ratio_last_epoch"] = statistics.median(s / (r * g) for _, s, g, r in last)
        out[f"{rho:g}/sharpness_over_loss_last_epoch"] = statistics.median(s / loss for loss, s, _, _ in last)
        out[f"{rho:g}/loss_last_epoch"] = statistics.median(loss for loss, _, _, _ in last)
        out[f"{rho:g}/test_error"] = 1 - fit_measures(model, train.dataset, val.dataset)["val_acc"]
    print(f"\nSAM on digits, seed 0, {args.digits_epochs} epochs; medians over an epoch's steps of what sam_log logs")
    print("| ρ | sharpness / (ρ·grad_norm), first epoch | last epoch | L(w), last epoch | sharpness / L(w), last epoch "
          "| test error |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for rho in rhos:
        k = f"{rho:g}/"
        ratios = [out[k + key] for key in ("first_order_ratio_first_epoch", "first_order_ratio_last_epoch")]
        print(f"| {rho:g} | {ratios[0]:.3f} | {ratios[1]:.3f} | {out[k + 'loss_last_epoch']:.3f} "
              f"| {out[k + 'sharpness_over_loss_last_epoch']:.3f} "
              f"| {out[k + 'test_error']:.4f} |")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; --fast: 2)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {TASKS}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--epochs", type=int, default=None, help="epochs, both tasks (default 20 each)")
    parser.add_argument("--digits-rho", type=float, default=0.05, help="SAM's ρ on digits (ASAM: 10x)")
    parser.add_argument("--device-rho", type=float, default=0.01, help="SAM's ρ on the device task (ASAM: 10x)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads during the runs (timing)")
    parser.add_argument("--fast", action="store_true", help="tiny and short: the CI smoke test")
    parser.add_argument(
        "--rho-sweep", metavar="RHOS", help="instead: SAM on digits at these comma-separated ρ, with sam_log's ratios"
    )
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not tasks or set(tasks) - set(TASKS) or len(set(tasks)) < len(tasks):
        parser.error(f"--tasks takes each of {TASKS} at most once, got {args.tasks!r}")
    if not variants or set(variants) - set(VARIANTS) or len(set(variants)) < len(variants):
        parser.error(f"--variants takes each of {VARIANTS} at most once, got {args.variants!r}")
    if "plain" not in variants:
        variants.insert(0, "plain")  # the reference every row is read against
    seeds = args.seeds if args.seeds is not None else (2 if args.fast else 3)
    if seeds < 1:
        parser.error(f"--seeds must be >= 1, got {seeds}")
    args.digits_n_train, args.digits_probe = (256, 128) if args.fast else (1400, 512)
    args.digits_epochs = args.epochs or (2 if args.fast else 20)
    args.device_epochs = args.epochs or (2 if args.fast else 20)
    args.device_repeats = 5 if args.fast else 25
    rhos = {"digits": args.digits_rho, "device": args.device_rho}
    if args.rho_sweep:
        try:
            sweep = [float(r) for r in args.rho_sweep.split(",")]
        except ValueError:
            parser.error(f"--rho-sweep takes comma-separated numbers, got {args.rho_sweep!r}")
        return rho_sweep(sweep, args)

    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results: dict[str, float] = {}
    try:
        data = make_data(40, 10 if args.fast else 20, 0) if "device" in tasks else None
        for task in tasks:
            per_seed: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            for seed in range(seeds):
                for variant in variants:
                    if task == "digits":
                        per_seed[variant].append(run_digits(variant, seed, args))
                    else:
                        per_seed[variant].append(run_device(variant, seed, args, data))
            for variant in variants:
                summary = summarize(per_seed[variant], per_seed["plain"])
                results.update({f"{task}/{variant}/{k}": v for k, v in summary.items()})
    finally:
        torch.set_num_threads(threads)

    setup = {
        "digits": f"digits: {args.digits_n_train} training samples, 20% labels flipped, {args.digits_epochs} epochs, "
        f"SGD lr 0.01 momentum 0.9, batch 32; probe: first {args.digits_probe} training samples",
        "device": f"device: 40 bias points x {args.device_repeats} per epoch, {args.device_epochs} epochs, Adam lr "
        "0.01 cosine, batch 10, MLP 2-64-LN-64-LN-1; probe: the 40 training points",
    }
    print(f"\n{seeds} seed(s), {args.threads} torch thread(s); worst-case sharpness at ρ = {SHARPNESS_RHO}")
    for task in tasks:
        print(setup[task])
    print()
    print("\n".join(table(results, tasks, variants, rhos)))
    print("\nReading (test error against plain's, beyond the larger of the two standard deviations over seeds):")
    print("\n".join(reading(results, tasks, variants, seeds)))
    return results


if __name__ == "__main__":
    main()
