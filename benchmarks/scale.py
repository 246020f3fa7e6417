#!/usr/bin/env python
"""Scale (issue 14): GPT-2-shaped causal LMs from transformers, ours against curvlinops and hessian-eigenthings.

One run, one model, one batch, one device; side by side:

1. one Hessian-vector product (HVP): ours (``LossOperator.hvp``; ``auto`` picks double backward under the math
   SDPA backend, fused attention having no double backward) and curvlinops' ``HessianLinearOperator`` (forward
   over reverse), with one gradient's time for scale;
2. the top eigenvalue to 1e-2 relative: our Lanczos (``tol=1e-2``) and hessian-eigenthings 1.x ``lanczos``
   (15 steps, its own residual test at 1e-2): products, seconds, error against our Lanczos run to 1e-6;
3. the trace by Hutch++ with the same number of products: ours and curvlinops' ``hutchpp_trace``;
4. an 11×11 ``LF.loss_surface`` against 121 plain forward passes of the same batch;
5. a SAM step against a plain one: ``SAMMixin`` through a real ``Trainer`` (AdamW), per-step wall time from
   ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward(s), optimizer step);
6. on CUDA, the peak memory (``torch.cuda.max_memory_allocated``) of every measurement next to a training
   step's; on a CPU it is not measured (no allocator peak counter; RSS deltas of a warm process measure the
   allocator's caching, not the phase).

``--sharded`` (CPU, gloo): the 1m model with ``fully_shard`` on each block and on the root in 2 processes (each
holding half the batch) against its unsharded twin in one process, same weights and batch: HVP, top eigenvalue
and slice times, and the eigenvalue each path finds.

Peers (not project dependencies; a peer that fails to import is skipped, the reason printed)::

    pip install --no-deps --target /tmp/peers curvlinops-for-pytorch einops einconv linear_operator \
        hessian-eigenthings==1.0.0a5
    python benchmarks/scale.py                       # 1m on the CPU; --size 124m|1b on a GPU; --sharded

The peers run under the math SDPA backend (neither has a fallback for fused attention without double
backward), the same backend our ``auto`` chooses.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _bench_models import LM_SIZES, gpt2_lm, lm_batch, lm_loss, machine_info, set_threads, sync, timed
from torch import Tensor, nn

from lightning_landscape import functional as LF

TOL = 1e-2  # the relative accuracy asked of the top eigenvalue
GRID = 11  # the slice's points per axis
EIGENTHINGS_STEPS = 15  # hessian-eigenthings' Lanczos has no adaptive stop: the issue's HVP target


# ---------------------------------------------------------------------------------------------- set-up
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(LM_SIZES), default=None, help="default 124m on CUDA, 1m on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sharded", action="store_true", help="2 gloo processes (fully_shard) against 1 unsharded")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median; default 3, 1 for 1b)")
    p.add_argument("--trace-hvps", type=int, default=30, help="Hutch++ products (ours and curvlinops')")
    p.add_argument("--reference-hvps", type=int, default=60, help="budget of the 1e-6 reference Lanczos (0: none)")
    p.add_argument("--sam-steps", type=int, default=6, help="Trainer steps per SAM/plain fit (first 2 untimed)")
    p.add_argument("--peers-path", default="/tmp/peers", help="folder the peers were pip-installed into")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per process); default 1 on a CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.device = torch.device(args.device)
    if args.sharded:
        if args.device.type != "cpu" or args.size not in (None, "1m"):
            p.error("--sharded runs the 1m model on the CPU (gloo), two processes")
        args.size = "1m"
    args.size = args.size or ("124m" if args.device.type == "cuda" else "1m")
    args.repeats = args.repeats or (1 if args.size == "1b" else 3)
    return args


class Peers:
    """curvlinops and hessian-eigenthings 1.x, if they import; why not otherwise."""

    def __init__(self, path: str) -> None:
        if path and os.path.isdir(path) and path not in sys.path:
            sys.path.insert(0, path)
        self.curvlinops: Any = None
        self.eigenthings: Any = None
        self.skipped: dict[str, str] = {}
        try:
            self.curvlinops = importlib.import_module("curvlinops")
            self.curvlinops.HessianLinearOperator, self.curvlinops.hutchpp_trace  # noqa: B018 (the API we use)
        except Exception as err:
            self.curvlinops = None
            self.skipped["curvlinops"] = f"{type(err).__name__}: {err}"
        try:
            self.eigenthings = importlib.import_module("hessian_eigenthings")
            if not hasattr(self.eigenthings, "HessianOperator"):
                raise ImportError("hessian_eigenthings lacks the 1.x API (HessianOperator)")
        except Exception as err:
            self.eigenthings = None
            self.skipped["hessian-eigenthings"] = f"{type(err).__name__}: {err}"


def math_sdpa() -> contextlib.AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class Memory:
    """Peak allocated memory per phase (CUDA); on a CPU every phase reads "not measured"."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.peaks: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            if self.cuda:
                sync(self.device)
                self.peaks[name] = max(self.peaks.get(name, 0.0), torch.cuda.max_memory_allocated(self.device))

    def text(self, name: str) -> str:
        if not self.cuda:
            return "not measured (CPU)"
        return f"{self.peaks[name] / 2**30:.2f} GiB" if name in self.peaks else "-"


def guarded(fn: Callable[[], Any]) -> tuple[Any, str]:
    """``(fn(), "")``, or ``(None, reason)`` when it fails (out of memory included: the cache is emptied)."""
    try:
        return fn(), ""
    except Exception as err:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
        return None, "out of memory" if oom else f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"


def fmt_s(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def unit_vector(op: Any, seed: int) -> Tensor:
    """A random unit vector ``[1, op.size]``: the same global vector on any number of processes."""
    space = op.space
    v = space.gaussian(1, op.size, torch.Generator().manual_seed(seed), op.dtype, op.device)
    return v / space.norms(v)[:, None]


def print_table(title: str, header: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for note in notes:
        print(f"  {note}")


# ---------------------------------------------------------------------------------------------- ours
def our_hvp(model: nn.Module, batch: dict, args: argparse.Namespace, method: str = "auto") -> dict[str, Any]:
    """One product's and one gradient's median time within an open operator; the first product's time (it
    chooses and checks the method) separately."""
    with LF.LossOperator(model, lm_loss, [batch], hvp_method=method) as op:
        v = unit_vector(op, args.seed)
        sync(args.device)
        t0 = time.perf_counter()
        op.hvp(v)
        sync(args.device)
        first = time.perf_counter() - t0
        hv, t_hvp = timed(lambda: op.hvp(v), args.device, args.repeats, warmup=0)
        _, t_grad = timed(op.gradient, args.device, args.repeats, warmup=0)
        return {"method": op.method, "first": first, "hvp": t_hvp, "grad": t_grad, "hv": hv, "v": v}


def our_top(model: nn.Module, batch: dict, args: argparse.Namespace, tol: float, budget: int) -> dict[str, Any]:
    """Our Lanczos for the top eigenvalue, from opening the operator on (every product counted)."""

    def run() -> tuple[Any, int]:
        with LF.LossOperator(model, lm_loss, [batch]) as op:
            r = LF.top_eigenvalues(op, 1, tol=tol, max_hvps=budget, generator=torch.Generator().manual_seed(1))
            return r, r.num_hvps + op.probe_hvps + op.check_hvps

    (r, hvps), t = timed(run, args.device, args.repeats if tol >= TOL / 10 else 1, warmup=0)
    return {"value": float(r.eigenvalues[0]), "hvps": hvps, "seconds": t, "converged": r.converged}


def our_trace(model: nn.Module, batch: dict, args: argparse.Namespace) -> dict[str, Any]:
    def run() -> Any:
        with LF.LossOperator(model, lm_loss, [batch]) as op:
            return LF.trace_estimate(op, args.trace_hvps, generator=torch.Generator().manual_seed(2))

    r, t = timed(run, args.device, args.repeats, warmup=0)
    return {"value": r.estimate, "stderr": r.stderr, "seconds": t}


def slice_vs_forwards(model: nn.Module, batch: dict, args: argparse.Namespace) -> dict[str, float]:
    def grid() -> Any:
        return LF.loss_surface(model, lm_loss, [batch], steps=GRID, generator=torch.Generator().manual_seed(3))

    def forwards() -> None:
        mode = model.training
        model.eval()
        with torch.no_grad():
            for _ in range(GRID * GRID):
                lm_loss(model, batch)
        model.train(mode)

    s, t_grid = timed(grid, args.device, args.repeats, warmup=0)
    _, t_fwd = timed(forwards, args.device, args.repeats, warmup=0)
    return {"grid": t_grid, "forwards": t_fwd, "finite": bool(torch.isfinite(s.losses).all())}


# ---------------------------------------------------------------------------------------------- peers
class _Logits(nn.Module):
    """curvlinops' ``model_func``: the batch without labels -> next-token logits ``[B·(T-1), V]``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: dict) -> Tensor:
        logits = self.lm(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # transformers' loss upcasts the same way


def curvlinops_operator(peers: Peers, model: nn.Module, batch: dict) -> Any:
    wrapper = _Logits(model).eval()
    x = {k: batch[k] for k in ("input_ids", "attention_mask")}
    y = batch["labels"][:, 1:].reshape(-1)
    return peers.curvlinops.HessianLinearOperator(
        wrapper, nn.CrossEntropyLoss(), [p for p in wrapper.parameters() if p.requires_grad], [(x, y)],
        check_deterministic=False, num_data=x["input_ids"].shape[0], batch_size_fn=lambda x: x["input_ids"].shape[0],
    )  # fmt: skip


def peer_hvp(peers: Peers, model: nn.Module, batch: dict, ours: dict, args: argparse.Namespace) -> dict[str, Any]:
    with math_sdpa():
        h = curvlinops_operator(peers, model, batch)
        v = ours["v"][0]
        hv, t = timed(lambda: h @ v, args.device, args.repeats, warmup=1)
    agree = float((hv - ours["hv"][0]).norm() / ours["hv"][0].norm())
    return {"hvp": t, "agree": agree}


def peer_trace(peers: Peers, model: nn.Module, batch: dict, args: argparse.Namespace) -> dict[str, Any]:
    with math_sdpa():
        h = curvlinops_operator(peers, model, batch)
        torch.manual_seed(2)  # curvlinops draws its probes from the global RNG
        value, t = timed(lambda: peers.curvlinops.hutchpp_trace(h, args.trace_hvps), args.device, args.repeats, 0)
    return {"value": float(value), "seconds": t}


def peer_top(peers: Peers, model: nn.Module, batch: dict, args: argparse.Namespace) -> dict[str, Any]:
    he = peers.eigenthings

    def run() -> tuple[Any, int]:
        base = he.HessianOperator(model, [batch], lm_loss)
        count = [0]

        def matvec(v: Tensor) -> Tensor:
            count[0] += 1
            return base.matvec(v)

        op = he.LambdaOperator(matvec, size=base.size, device=base.device, dtype=base.dtype)
        mode = model.training
        model.eval()  # as ours measures
        try:
            with math_sdpa():
                res = he.lanczos(op, k=1, max_iter=EIGENTHINGS_STEPS, tol=TOL, which="LA", seed=args.seed)
        finally:
            model.train(mode)
        return res, count[0]

    (res, hvps), t = timed(run, args.device, args.repeats, warmup=0)
    return {"value": float(res.eigenvalues[0]), "hvps": hvps, "seconds": t, "converged": bool(res.converged[0])}


# ---------------------------------------------------------------------------------------------- SAM
def sam_vs_plain(args: argparse.Namespace, memory: Memory) -> dict[str, float]:
    """Median per-step wall time of ``SAMMixin`` with ``sam`` on and off, through a Trainer (fresh model each)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_landscape import SAMMixin

    class LM(SAMMixin, pl.LightningModule):
        def __init__(self, sam: bool) -> None:
            super().__init__(sam=sam, sam_rho=0.05)
            self.model = gpt2_lm(args.size, args.device)  # built in place: a 1B model's CPU init is slow

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class StepTimer(pl.Callback):
        def __init__(self, phase: str) -> None:
            self.phase, self.times, self._ctx = phase, [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._ctx = memory.phase(self.phase) if batch_idx >= 2 else contextlib.nullcontext()
            self._ctx.__enter__()
            sync(args.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(args.device)
            self.times.append(time.perf_counter() - self.t0)
            self._ctx.__exit__(None, None, None)

    out = {}
    batch = lm_batch(args.size)
    for sam in (False, True):
        timer = StepTimer("SAM step" if sam else "training step")
        trainer = pl.Trainer(
            accelerator="gpu" if args.device.type == "cuda" else "cpu", devices=1, max_steps=args.sam_steps,
            logger=False, callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few workers, ...
            trainer.fit(LM(sam), DataLoader([batch] * args.sam_steps, batch_size=None))
        out["sam" if sam else "plain"] = statistics.median(timer.times[2:])
        del trainer
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- unsharded
def run_unsharded(args: argparse.Namespace) -> None:
    peers = Peers(args.peers_path)
    memory = Memory(args.device)
    model = gpt2_lm(args.size, args.device)
    batch = lm_batch(args.size, args.device)
    shape = LM_SIZES[args.size]
    n = sum(p.numel() for p in model.parameters())
    print(machine_info(args.device))
    print(
        f"model: GPT-2-shaped GPT2LMHeadModel '{args.size}', {n:,} parameters ({shape['n_layer']} blocks, width "
        f"{shape['n_embd']}, vocabulary {shape['vocab_size']}), float32, SDPA; batch {shape['batch']}×{shape['seq']} "
        f"tokens; median of {args.repeats}"
    )
    for name, why in peers.skipped.items():
        print(f"skipped {name}: {why}")

    # 1. one product
    with memory.phase("HVP"):
        ours, err = guarded(lambda: our_hvp(model, batch, args))
    if ours is None:
        raise SystemExit(f"our HVP failed: {err}")
    rows = [["ours", ours["method"], fmt_s(ours["hvp"]), f"{ours['hvp'] / ours['grad']:.1f}", "-"]]
    notes = [
        f"ours: first product {fmt_s(ours['first'])} (chooses the method, checks it: ~4 more products)",
        "curvlinops' product is jvp(jacrev(loss)); on GPT-2 it differs from jvp(grad(loss)) (= ours, = finite",
        "  differences to 2e-8 in float64) in the LayerNorm weights' rows: a torch.func effect, not investigated",
    ]
    if peers.curvlinops is not None:
        with memory.phase("HVP curvlinops"):
            peer, err = guarded(lambda: peer_hvp(peers, model, batch, ours, args))
        if peer is None:
            rows.append(["curvlinops", "forward-over-reverse", err, "-", "-"])
        else:
            ratio = f"{peer['hvp'] / ours['grad']:.1f}"
            rows.append(["curvlinops", "forward-over-reverse", fmt_s(peer["hvp"]), ratio, f"{peer['agree']:.1e}"])
    print_table(
        f"One Hessian-vector product (one gradient: {fmt_s(ours['grad'])})",
        ["library", "method", "time", "in gradients", "|Hv - ours| / |ours|"],
        rows,
        notes,
    )

    # 2. top eigenvalue
    ref = None
    if args.reference_hvps:
        ref, err = guarded(lambda: our_top(model, batch, args, 1e-6, args.reference_hvps))
    with memory.phase("top-1"):
        top, err_top = guarded(lambda: our_top(model, batch, args, TOL, 100))
    tight, err_tight = guarded(lambda: our_top(model, batch, args, TOL / 10, 100))
    rows = []

    def row(name: str, r: dict | None, err: str) -> list[str]:
        if r is None:
            return [name, err, "-", "-", "-", "-"]
        error = f"{rel(r['value'], ref['value']):.1e}" if ref is not None else "-"
        return [name, f"{r['value']:.6g}", error, str(r["hvps"]), str(r["converged"]), fmt_s(r["seconds"])]

    rows.append(row("ours, Lanczos tol 1e-2", top, err_top))
    rows.append(row("ours, Lanczos tol 1e-3", tight, err_tight))
    if peers.eigenthings is not None:
        with memory.phase("top-1 eigenthings"):
            peer, err = guarded(lambda: peer_top(peers, model, batch, args))
        rows.append(row(f"eigenthings lanczos, {EIGENTHINGS_STEPS} steps", peer, err))
    reference = "none (--reference-hvps 0)"
    if ref is not None:
        reference = f"ours at tol 1e-6: {ref['value']:.8g} ({ref['hvps']} HVPs, converged {ref['converged']})"
    print_table(
        "Top eigenvalue, asked to 1e-2",
        ["solver", "λ1", "rel err", "HVPs", "converged", "time"],
        rows,
        [f"reference: {reference}", "ours: HVPs include the product that chooses the method and the ~4 that check it"],
    )

    # 3. trace
    with memory.phase("trace"):
        tr, err = guarded(lambda: our_trace(model, batch, args))
    rows = [["ours, Hutch++", f"{tr['value']:.6g} ± {tr['stderr']:.2g}", fmt_s(tr["seconds"])] if tr else
            ["ours", err, "-"]]  # fmt: skip
    if peers.curvlinops is not None:
        with memory.phase("trace curvlinops"):
            peer, err = guarded(lambda: peer_trace(peers, model, batch, args))
        rows.append(["curvlinops hutchpp_trace", f"{peer['value']:.6g}", fmt_s(peer["seconds"])] if peer else
                    ["curvlinops hutchpp_trace", err, "-"])  # fmt: skip
    print_table(
        f"Trace, Hutch++ with {args.trace_hvps} products",
        ["estimator", "estimate", "time"],
        rows,
        ["± the standard error of the Hutchinson third: the two estimates are draws of one noisy estimator"],
    )

    # 4. slice
    with memory.phase("slice"):
        sl, err = guarded(lambda: slice_vs_forwards(model, batch, args))
    if sl is None:
        print(f"\n{GRID}×{GRID} slice: {err}")
    else:
        print(
            f"\n{GRID}×{GRID} loss_surface {fmt_s(sl['grid'])} vs {GRID * GRID} plain forward passes "
            f"{fmt_s(sl['forwards'])}: {sl['grid'] / sl['forwards']:.2f}x (all finite: {sl['finite']})"
        )
    model = batch = None  # free the device for the Trainer's own models
    if args.device.type == "cuda":
        torch.cuda.empty_cache()

    # 5. SAM, and the training step's memory
    sam, err = guarded(lambda: sam_vs_plain(args, memory))
    if sam is None:
        print(f"\nSAM vs plain step: {err}")
    else:
        print(
            f"\nTrainer step (AdamW), median of {args.sam_steps - 2}: plain {fmt_s(sam['plain'])}, SAM "
            f"{fmt_s(sam['sam'])}: {sam['sam'] / sam['plain']:.2f}x"
        )
    # 6. memory
    phases = ["training step", "SAM step", "HVP", "HVP curvlinops", "top-1", "top-1 eigenthings", "trace",
              "trace curvlinops", "slice"]  # fmt: skip
    print_table("Peak memory allocated", ["phase", "peak"], [[p, memory.text(p)] for p in phases])


# ---------------------------------------------------------------------------------------------- sharded
def shard(model: nn.Module, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings (tied to the head) and the final LayerNorm


def core(model: nn.Module, batch: dict, args: argparse.Namespace, method: str = "auto") -> dict[str, Any]:
    """HVP, top eigenvalue and slice times on ``model`` (sharded or not: the operator decides)."""
    reshard = getattr(model, "reshard", lambda: None)  # see `run_sharded`
    out: dict[str, Any] = {}
    with LF.LossOperator(model, lm_loss, [batch], hvp_method=method) as op:
        v = unit_vector(op, args.seed)
        op.hvp(v)
        _, out["hvp"] = timed(lambda: op.hvp(v), args.device, args.repeats, warmup=0)
        _, out["grad"] = timed(op.gradient, args.device, args.repeats, warmup=0)
        out["method"] = op.method
    reshard()

    def top() -> Any:
        with LF.LossOperator(model, lm_loss, [batch], hvp_method=method) as op:
            r = LF.top_eigenvalues(op, 1, tol=TOL, max_hvps=100, generator=torch.Generator().manual_seed(1))
            return r, r.num_hvps + op.probe_hvps + op.check_hvps

    (r, out["top_hvps"]), out["top"] = timed(top, args.device, args.repeats, warmup=0)
    out["top_value"] = float(r.eigenvalues[0])
    reshard()
    s = slice_vs_forwards(model, batch, args)
    reshard()
    out["slice"], out["forwards"] = s["grid"], s["forwards"]
    return out


def _sharded_worker(rank: int, args: argparse.Namespace, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    warnings.filterwarnings("ignore")
    set_threads(args.threads, args.device)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    model = gpt2_lm(args.size)
    shard(model, init_device_mesh("cpu", (2,)))
    half = LM_SIZES[args.size]["batch"] // 2
    out = core(model, lm_batch(args.size, rows=slice(rank * half, (rank + 1) * half)), args)
    if rank == 0:
        with open(os.path.join(folder, "sharded.json"), "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


def run_sharded(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    set_threads(args.threads, args.device)
    print(machine_info(args.device))
    shape = LM_SIZES[args.size]
    model = gpt2_lm(args.size)
    batch = lm_batch(args.size)
    print(
        f"model: GPT-2-shaped '{args.size}', {sum(p.numel() for p in model.parameters()):,} parameters, float32; batch "
        f"{shape['batch']}×{shape['seq']} tokens (sharded: {shape['batch'] // 2} per process); median of "
        f"{args.repeats}; {torch.get_num_threads()} torch thread(s) per process"
    )
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        mp.spawn(_sharded_worker, args=(args, folder), nprocs=2)
        wall = time.perf_counter() - t0
        with open(os.path.join(folder, "sharded.json")) as f:
            sharded = json.load(f)
    twin = core(model, batch, args)
    twin_fd = core(model, batch, args, method="finite_difference")
    ref = our_top(model, batch, args, 1e-6, args.reference_hvps or 60)
    cols = [("2 processes, fully_shard", sharded), ("1 process, auto", twin), ("1 process, finite_difference", twin_fd)]
    rows = [
        ["HVP method", *[c["method"] for _, c in cols]],
        ["one HVP", *[fmt_s(c["hvp"]) for _, c in cols]],
        ["one gradient", *[fmt_s(c["grad"]) for _, c in cols]],
        [f"top-1 to {TOL:g}: time", *[fmt_s(c["top"]) for _, c in cols]],
        ["top-1: HVPs", *[str(c["top_hvps"]) for _, c in cols]],
        ["top-1: λ1 (rel err)", *[f"{c['top_value']:.5g} ({rel(c['top_value'], ref['value']):.1e})" for _, c in cols]],
        [f"{GRID}×{GRID} slice", *[fmt_s(c["slice"]) for _, c in cols]],
        [f"{GRID * GRID} forward passes", *[fmt_s(c["forwards"]) for _, c in cols]],
    ]
    print_table(
        "Sharded (FSDP2, gloo) against its unsharded twin: same weights, same batch",
        ["", *[name for name, _ in cols]],
        rows,
        [
            f"reference λ1: unsharded Lanczos to 1e-6 = {ref['value']:.8g} ({ref['hvps']} HVPs)",
            f"the sharded run's whole wall time, process start to finish: {wall:.1f} s",
            "between phases the script also reshards by hand (model.reshard()); the library now does so itself",
            "  around every write of the shards (FSDP2 leaves the root unsharded after a loss-only evaluation)",
        ],
    )


def main() -> None:
    args = parse_args()
    import logging

    import pytorch_lightning  # noqa: F401 (it sets its loggers' levels on import: quiet them after)

    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available: ..." per fit
    if args.sharded:
        run_sharded(args)
        return
    set_threads(args.threads, args.device)
    run_unsharded(args)


if __name__ == "__main__":
    main()
