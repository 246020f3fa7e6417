#!/usr/bin/env python
"""Benchmark a 21x21 loss surface against 441 plain forward passes and the loss-landscapes package.

One run, one model, the same probe batches, one device. Timed (median of ``--repeats``, the methods
interleaved so that a change in machine load hits them alike):

1. ``plain``: ``steps²`` forward passes of the loss over the probe batches, in eval mode under ``no_grad``,
   the losses kept as tensors (no host synchronisation) -- the floor any slice must pay;
2. ``loss_surface``: ``lightning_landscape.functional.surface.loss_surface`` including drawing and
   filter-normalizing the two directions; the bound to meet is 1.25x ``plain``;
3. ``LossOperator.loss``: the same grid through the generic operator, one ``op.loss(a·δ + b·η)`` per point
   (what ``loss_surface`` would cost without its lean path; shown for reference);
4. ``loss-landscapes``: ``loss_landscapes.random_plane(model, Loss(...), distance=1, steps=21,
   normalization="filter", deepcopy_model=True)`` on the first probe batch (its metric takes one batch).

The peer is not a project dependency. Install it into a throw-away folder::

    pip install --no-deps --target /tmp/peers_ll loss-landscapes
    python benchmarks/landscape.py                  # --device cpu|cuda, --model mlp|cnn|resnet, --quick

If it cannot be imported (or fails on the model) it is skipped with the reason printed. Correctness is
checked too: the surface's centre against the plain loss, and one corner against a copy of the model whose
weights were shifted by hand.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _bench_models import CRITERION, digits_net, load_digits, loss_fn, train_sgd
from torch import Tensor, nn

from lightning_landscape.functional import LossOperator
from lightning_landscape.functional.surface import grid_coords, loss_surface, random_directions

BOUND = 1.25  # loss_surface may cost at most this many times the plain forward passes


# ---------------------------------------------------------------------------------------------- set-up
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=("mlp", "cnn", "resnet"), default="resnet")
    p.add_argument("--width", type=int, default=16, help="channels of the resnet / hidden units of the mlp")
    p.add_argument("--batch-size", type=int, default=128, help="samples per probe batch")
    p.add_argument("--num-batches", type=int, default=1, help="probe batches (the peer sees the first only)")
    p.add_argument("--steps", type=int, default=21, help="grid points per axis (odd)")
    p.add_argument("--train-steps", type=int, default=50, help="full-batch SGD steps before measuring")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers-path", default="/tmp/peers_ll", help="folder loss-landscapes was pip-installed into")
    p.add_argument("--quick", action="store_true", help="one repeat, smaller batch (a rough run)")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.batch_size = 1, 64
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- methods
def plain(model: nn.Module, batches: list, points: int) -> Tensor:
    """``points`` forward passes of the loss over every batch, losses kept on the device."""
    model.eval()
    out = []
    with torch.no_grad():
        for _ in range(points):
            for b in batches:
                out.append(loss_fn(model, b))
    return torch.stack(out)


def ours(model: nn.Module, batches: list, steps: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return loss_surface(model, loss_fn, batches, steps=steps, distance=1.0, generator=gen).losses


def operator_loss(model: nn.Module, batches: list, steps: int, seed: int) -> Tensor:
    dirs = random_directions(model, torch.Generator().manual_seed(seed))
    coords = grid_coords(steps, 1.0).tolist()
    with LossOperator(model, loss_fn, batches) as op:
        values = [op.loss(a * dirs[0] + b * dirs[1]) for a in coords for b in coords]
    return torch.stack(values).reshape(steps, steps).cpu()


def load_peer(path: str) -> tuple[Any, str]:
    if path and os.path.isdir(path) and path not in sys.path:
        sys.path.insert(0, path)
    try:
        import loss_landscapes
        from loss_landscapes.metrics import Loss
    except Exception as err:  # not installed, or its imports fail
        return None, f"skipped ({type(err).__name__}: {err})"
    try:
        version = importlib.metadata.version("loss-landscapes")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(loss_landscapes, "__version__", "?")
    return (loss_landscapes, Loss), version


def peer_plane(peer: tuple[Any, Any], model: nn.Module, batch: tuple[Tensor, Tensor], steps: int) -> Any:
    loss_landscapes, loss_metric = peer
    model.eval()
    metric = loss_metric(CRITERION, batch[0], batch[1])
    return loss_landscapes.random_plane(
        model, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True
    )


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    x, y = load_digits(device, args.seed)
    model = digits_net(args.model, args.width).to(device)
    train_sgd(model, x[:1024], y[:1024], args.train_steps)
    n = args.batch_size
    batches = [(x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(args.num_batches)]
    if any(len(b[0]) < n for b in batches):
        raise SystemExit(f"not enough digits for {args.num_batches} batches of {n}")
    points = args.steps**2
    numel = sum(p.numel() for p in model.parameters())
    peer, peer_version = load_peer(args.peers_path)

    print(f"# benchmarks/landscape.py  {datetime.datetime.now().isoformat(timespec='seconds')}")
    cpu = platform.processor() or platform.machine()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})"
    print(
        f"device: {dev_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, python "
        f"{platform.python_version()}"
    )
    print(
        f"model: {args.model} (width {args.width}, {numel:,} parameters), probe {args.num_batches} x {n} digits, "
        f"grid {args.steps}x{args.steps} = {points} points, repeats {args.repeats} (median)"
    )
    print(f"loss-landscapes: {peer_version}")

    methods: dict[str, Callable[[int], Any]] = {
        "plain forward passes": lambda steps: plain(model, batches, steps**2),
        "loss_surface": lambda steps: ours(model, batches, steps, args.seed),
        "LossOperator.loss per point": lambda steps: operator_loss(model, batches, steps, args.seed),
    }
    peer_note = ""
    if peer is not None:
        try:  # one tiny run first: a peer that fails on this model is reported, not fatal
            peer_plane(peer, model, batches[0], 3)
            methods["loss-landscapes random_plane"] = lambda steps: peer_plane(peer, model, batches[0], steps)
        except Exception as err:
            peer_note = f"loss-landscapes random_plane failed on this model: {type(err).__name__}: {err}"

    before = {k: v.clone() for k, v in model.state_dict().items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, Any] = {}
    for fn in methods.values():  # warm-up on a 3x3 grid
        fn(3)
    for _ in range(args.repeats):  # interleaved, so that a change in machine load hits every method alike
        for name, fn in methods.items():
            sync(device)
            t0 = time.perf_counter()
            results[name] = fn(args.steps)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights changed"

    base = statistics.median(times["plain forward passes"])
    print()
    print("| method | seconds | x plain | ms per point | forward passes |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        passes = points if name.startswith("loss-landscapes") else points * args.num_batches
        print(f"| {name} | {t:.3f} | {t / base:.2f} | {1e3 * t / points:.2f} | {passes} |")
    if peer_note:
        print(f"| loss-landscapes random_plane | – | – | – | {peer_note} |")

    # correctness: centre = plain loss; a corner = the loss of a copy with its weights shifted by hand
    surface = results["loss_surface"]
    mid = args.steps // 2
    with torch.no_grad():
        center = sum(float(loss_fn(model, b)) * len(b[0]) for b in batches) / (n * args.num_batches)
        dirs = random_directions(model, torch.Generator().manual_seed(args.seed))
        shifted = copy.deepcopy(model)
        offset = 0
        for p in shifted.parameters():
            k = p.numel()
            p.add_((-dirs[0][offset : offset + k] + dirs[1][offset : offset + k]).reshape(p.shape))
            offset += k
        corner = sum(float(loss_fn(shifted, b)) * len(b[0]) for b in batches) / (n * args.num_batches)
    op_grid = results["LossOperator.loss per point"]
    print()
    print(
        f"centre: loss_surface {surface[mid, mid]:.6f}, plain {center:.6f}; corner (a=-1, b=+1): "
        f"loss_surface {surface[0, -1]:.6f}, weights shifted by hand {corner:.6f}; "
        f"max |loss_surface - LossOperator.loss| {float((surface - op_grid.double()).abs().max()):.2e}"
    )
    ratio = statistics.median(times["loss_surface"]) / base
    verdict = "within" if ratio <= BOUND else "OVER"
    print(f"loss_surface / plain = {ratio:.2f} ({verdict} the {BOUND}x bound)")


if __name__ == "__main__":
    main()
