"""Per-block curvature: the top Hessian eigenvalue and the trace of every parameter block, in one call.

A block is a set of parameters (a layer, a top-level module, one tensor, or a user's choice); its Hessian block
``H_jj`` is the curvature of the loss in those parameters with the others fixed. One Lanczos run per block (full
reorthogonalization within the block) advances in lockstep with the others, one product per running block per
step; blocks that converged drop out, and the few numbers each step decides on reach the host in one transfer (on
CPU threads, each run goes at its own pace instead; see ``"per_block"`` below).
Traces are exact (unit vectors) for blocks no larger than the sample budget, Hutch++ for the others, all blocks'
probes in two rounds. The products come from one of two places (``products=``):

- ``"shared"``: one operator over the union of the blocks; a row that is zero outside block ``j`` gives
  ``H[:, j] v_j``, whose block-``j`` part is ``H_jj v_j``, so one batched product of ``B`` rows serves ``B`` blocks
  (sent batched or row by row, whichever is faster per row, measured once). Each row costs a whole-model product.
- ``"per_block"``: each block's product restricted to its parameters, so autograd differentiates only what the
  block needs (a product for the last layer of the digits ResNet costs under 1% of a whole-model one on a CPU),
  back-propagated from the one gradient graph of an operator over all the blocks
  (:meth:`~lightning_landscape.functional.LossOperator.restricted_hvp`); on a CPU the blocks' runs go on side by
  side on several threads where measured faster (:func:`cpu_threads`), each at its own pace. Where that operator
  cannot (a method other than double backward, several processes), from one operator per block, which reuses the
  first operator's choice of method and keeps a gradient graph of its own.

Each block's Lanczos run starts from its part of ``H z`` (``z`` Gaussian over all the blocks: one whole product for
all of them, which also chooses and checks the product method), plus :data:`START_NOISE` times a random unit
vector of its own. ``H z`` leans toward the directions of high curvature, which the blocks' top eigenvectors
share: on the 15 layers of the digits ResNet the blocks' runs then take 80–85 products where Gaussian starts take
89–96, and the expensive early layers gain most. Each row counts as one Hessian-vector product.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._operator import SymmetricOperator
from ._params import ParamsArg, select_parameters
from ._random import gaussian, make_generator, rademacher
from ._sharded import is_sharded
from ._space import EUCLIDEAN
from .hvp import LossFn, LossOperator, MeasurementError

__all__ = [
    "BLOCK_SPLITS",
    "PRODUCT_SOURCES",
    "BlockResult",
    "block_curvature",
    "block_estimates",
    "cpu_threads",
    "missing_parameters",
    "split_blocks",
]

#: The ways :func:`split_blocks` splits a model by itself (a mapping ``{block: params}`` is the user's own split).
BLOCK_SPLITS = ("module", "layer", "parameter")
# rows per batched product call: bounds the dense [rows, n] blocks of vectors held at once (the operator's own
# chunk_size further bounds the rows per backward pass)
MAX_ROWS = 64
#: Where :func:`block_curvature` takes the blocks' products from (see the module's docstring); ``"auto"`` is
#: ``"per_block"`` on a CPU, where restricting each product to its block saved more than batching the blocks' rows
#: on every digits model of ``benchmarks/blocks.py`` (MLP, CNN, ResNet), and ``"shared"`` elsewhere, where batching
#: several vectors is several times cheaper per vector (not yet measured for blocks on a GPU).
PRODUCT_SOURCES = ("auto", "shared", "per_block")
# a Lanczos residual below DEFLATION_TOL · eps · ‖T‖ is an invariant subspace (as in _lanczos.block_lanczos)
DEFLATION_TOL = 100.0
#: Seconds a step of the blocks' restricted products must take, one after another, for :func:`block_curvature` to try
#: them side by side on threads (for the eigenvalues estimated as the first product alone times the blocks still
#: running; for the traces, the first round's products timed). Below it the threads' fixed costs (Python's lock on its
#: interpreter at every step, the hand-over at the end) eat the gain: measured on this 2-core CPU, one thread's wall
#: time over the threads', with every step tried on them: the digits MLP's 4 blocks (~3 ms) 1.45x–1.63x slower, the
#: digits CNN's (8–15 ms) 1.03x–1.08x slower and 39 ms at width 32 even, the digits ResNets' (44–260 ms) 1.15x–1.30x
#: faster.
MIN_THREADED_STEP = 0.02
#: The weight of a block's own random unit vector in its start (next to its unit part of ``H z``): every direction of
#: the block is in the start, even one ``H z`` barely touches. Digits ResNet, 15 blocks, products over three seeds:
#: 83 with 0, 80–85 with 0.1, 84–88 with 0.3, 83–88 with 1.0; Gaussian starts alone 89–96.
START_NOISE = 0.1


def split_blocks(model: nn.Module, by: str | Mapping[str, ParamsArg] = "module") -> dict[str, list[str]]:
    """Split ``model``'s parameters into named blocks: ``{block name: [parameter names]}``, in the model's order.

    Args:
        model: the module.
        by: ``"module"``: one block per top-level child module (named as the child); ``"layer"``: one per module that
            owns parameters itself (named by its path, e.g. ``"encoder.0.linear1"``); ``"parameter"``: one per
            parameter. A parameter held by ``model`` itself is its own block (named as the parameter). Parameters
            without ``requires_grad`` are skipped, and so are modules left without any. Or a mapping
            ``{block name: params}`` with each value anything ``params=`` accepts (names, glob patterns, a predicate,
            a submodule, tensors; see :func:`~lightning_landscape.functional._params.select_parameters`): the
            user's blocks, which must each select something and must not overlap (parameters in no block are
            left out).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)))
        >>> split_blocks(net)
        {'0': ['0.weight', '0.bias'], '2': ['2.0.weight', '2.0.bias', '2.1.weight', '2.1.bias']}
        >>> list(split_blocks(net, "layer"))
        ['0', '2.0', '2.1']
        >>> split_blocks(net, {"weights": "*.weight", "head": net[2][1].bias})
        {'weights': ['0.weight', '2.0.weight', '2.1.weight'], 'head': ['2.1.bias']}
    """
    if isinstance(by, Mapping):
        return _user_blocks(model, by)
    if by not in BLOCK_SPLITS:
        raise ValueError(f"`by` must be one of {BLOCK_SPLITS} or a mapping {{block name: params}}, got {by!r}.")
    blocks: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner, _, _ = name.rpartition(".")
        if by == "parameter" or not owner:  # a parameter of the model itself: its own block
            key = name
        else:
            key = owner if by == "layer" else owner.split(".")[0]
        blocks.setdefault(key, []).append(name)
    if not blocks:
        raise ValueError("`model` has no parameter with requires_grad: there is nothing to split into blocks.")
    return blocks


def _user_blocks(model: nn.Module, by: Mapping[str, ParamsArg]) -> dict[str, list[str]]:
    if not by:
        raise ValueError("`by` must hold at least one block, got an empty mapping.")
    blocks: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for key, spec in by.items():
        if not isinstance(key, str):
            raise ValueError(f"`by`: block names must be strings, got {key!r}.")
        try:
            names = select_parameters(model, spec)
        except ValueError as err:
            raise ValueError(f"`by`[{key!r}]: {err}") from None
        for n in names:
            if n in owner:
                raise ValueError(f"`by`: blocks {owner[n]!r} and {key!r} overlap (both hold {n!r}).")
            owner[n] = key
        blocks[key] = names
    return blocks


@dataclass
class BlockResult:
    """Per-block curvature, each attribute a dict keyed by block name (in the blocks' order).

    Attributes:
        blocks: the parameter names of each block (``{}`` from :func:`block_estimates`, which sees columns only).
        sizes: the number of scalar parameters in each block.
        eigenvalues: the top (largest algebraic) eigenvalue of each Hessian block ``H_jj`` (empty if not asked).
        converged: whether that eigenvalue met ``tol``.
        eigenvectors: its unit eigenvector, in the block's own flat order (the block's parameters in the model's
            order), when asked for.
        traces: ``tr(H_jj)`` (empty if not asked); with Hutch++ exact for blocks of at most ``trace_samples``
            parameters.
        trace_stderr: the standard error of each trace (0 where exact; that of the Hutchinson part for Hutch++).
        num_hvps: Hessian-vector products each block used on its own (each row of a batched product is one).
        total_hvps: all products, with the one ``hvp_method="auto"`` may spend choosing.
        seconds: wall time of the call.
        hvp_method: the product method that ran.
        rows_batched: with ``products="shared"``, whether the blocks' rows went through one batched product (``True``)
            or row by row (``False``), as measured faster; ``None`` when not decided (or ``products="per_block"``).
        threads: with ``products="per_block"`` on a CPU, the threads the blocks' products ran on side by side, all
            or some of them (after a switch back to one after another, only the few that measured it); 1: every
            product on the caller's thread (a step too quick to try threads, only one thread may run, or the
            products fell back to one operator per block; see :func:`cpu_threads` and :data:`MIN_THREADED_STEP`).
    """

    blocks: dict[str, list[str]]
    sizes: dict[str, int]
    eigenvalues: dict[str, float] = field(default_factory=dict)
    converged: dict[str, bool] = field(default_factory=dict)
    eigenvectors: dict[str, Tensor] = field(default_factory=dict)
    traces: dict[str, float] = field(default_factory=dict)
    trace_stderr: dict[str, float] = field(default_factory=dict)
    num_hvps: dict[str, int] = field(default_factory=dict)
    total_hvps: int = 0
    seconds: float = 0.0
    hvp_method: str = ""
    rows_batched: bool | None = None
    threads: int = 1


class _Block:
    """One block's columns of the flat vector, as ``(start, stop)`` ranges, and scatter/gather between the two."""

    def __init__(self, name: str, ranges: list[tuple[int, int]]) -> None:
        self.name, self.ranges, self.size = name, ranges, sum(b - a for a, b in ranges)

    @classmethod
    def from_columns(cls, name: str, columns: Sequence[int] | Tensor, n: int) -> _Block:
        """The block of the given column indices (sorted, duplicates dropped) of flat vectors of length ``n``."""
        cols = sorted({int(c) for c in (columns.tolist() if isinstance(columns, Tensor) else columns)})
        if not cols:
            raise ValueError(f"`blocks`[{name!r}] holds no column.")
        if cols[0] < 0 or cols[-1] >= n:
            raise ValueError(f"`blocks`[{name!r}]: columns must lie in [0, {n}), got {cols[0]}..{cols[-1]}.")
        ranges, start = [], cols[0]
        for a, b in zip(cols, [*cols[1:], None], strict=True):
            if b != a + 1:
                ranges.append((start, a + 1))
                start = b
        return cls(name, ranges)

    def gather(self, rows: Tensor) -> Tensor:
        """``[r, n] -> [r, size]``: the block's columns."""
        if len(self.ranges) == 1:
            return rows[:, self.ranges[0][0] : self.ranges[0][1]]
        return torch.cat([rows[:, a:b] for a, b in self.ranges], dim=1)

    def scatter(self, values: Tensor, rows: Tensor) -> None:
        """Write ``values [r, size]`` into the block's columns of ``rows [r, n]``."""
        offset = 0
        for a, b in self.ranges:
            rows[:, a:b] = values[:, offset : offset + b - a]
            offset += b - a


class _Products:
    """What both product sources share: the operator over all the blocks, its whole products ``H z`` and the
    products spent besides the blocks' own (those an open operator had spent before are not counted again)."""

    def __init__(self, operator: SymmetricOperator) -> None:
        self.operator = operator
        self.dtype, self.device = operator.dtype, torch.device(operator.device)
        self.whole_hvps = 0  # whole products: the start's, or one only to choose and check the method
        self._spent = getattr(operator, "probe_hvps", 0)  # choosing products an open operator spent before

    @property
    def method(self) -> str:
        return getattr(self.operator, "method", "")

    @property
    def size(self) -> int:
        return self.operator.size

    def extra_hvps(self) -> int:
        """Products spent besides the blocks' own (the start's, ``hvp_method="auto"`` choosing)."""
        return getattr(self.operator, "probe_hvps", 0) - self._spent + self.whole_hvps

    def whole(self, z: Tensor) -> Tensor:
        """``H z`` over all the blocks (``z`` flat, as the operator's vectors)."""
        self.whole_hvps += 1
        return self.operator.matmat(z.unsqueeze(0))[0]

    def block_products(self, work: Sequence[tuple[_Block, Tensor]]) -> list[Tensor]:
        """``H_jj V`` for each ``(block j, V [r, size_j])``: the source's own way."""
        raise NotImplementedError

    def run_chains(self, chains: Sequence[_Chain]) -> None:
        """Advance the blocks' Lanczos runs until each is done: in lockstep, one product call for the still-running
        blocks per step, and the few numbers each step decides on reach the host in one transfer."""
        active = [c for c in chains if not c.done]
        while active:
            hq = self.block_products([(c.block, c.q.unsqueeze(0)) for c in active])
            steps = torch.stack([c.absorb(h[0]) for c, h in zip(active, hq, strict=True)]).tolist()
            for c, (alpha, beta) in zip(active, steps, strict=True):
                c.decide(alpha, beta)
            active = [c for c in active if not c.done]

    def _clock(self) -> float:
        """Seconds, for the measured choices (after the device's queued work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class _Shared(_Products):
    """Products from one operator over the union of the blocks: rows zero outside their block, several blocks'
    rows in one call (at most :data:`MAX_ROWS`), sent through as one batched product or row by row, whichever is
    faster per row here. Measured once, on products needed anyway: the first call of several rows goes row by row,
    each row after the first timed (the first pays for the operator's method choice and checks); the second goes
    batched, timed; the faster way serves every later call. (A batched double backward is several times cheaper
    per vector than a loop on a GPU; on a CPU we measured it at 0.4x a loop's time per row on the digits MLP and
    1.1x to 1.9x on the digits ResNet.)"""

    def __init__(self, operator: SymmetricOperator) -> None:
        super().__init__(operator)
        self.batched: bool | None = None  # None: not decided yet
        self._looped: float | None = None  # seconds per row, row by row

    def block_products(self, work: Sequence[tuple[_Block, Tensor]]) -> list[Tensor]:
        """``H_jj V`` for each ``(block j, V [r, size_j])``."""
        n = self.operator.size
        segments = [
            (i, lo, min(lo + MAX_ROWS, len(v))) for i, (_, v) in enumerate(work) for lo in range(0, len(v), MAX_ROWS)
        ]
        outs: list[list[Tensor]] = [[] for _ in work]
        while segments:
            chunk, count = [], 0
            while segments and count + segments[0][2] - segments[0][1] <= MAX_ROWS:
                seg = segments.pop(0)
                chunk.append((seg, count))
                count += seg[2] - seg[1]
            rows = torch.zeros(count, n, dtype=self.dtype, device=self.device)
            for (i, lo, hi), at in chunk:
                work[i][0].scatter(work[i][1][lo:hi].to(self.dtype), rows[at : at + hi - lo])
            out = self._matmat(rows)
            for (i, lo, hi), at in chunk:
                outs[i].append(work[i][0].gather(out[at : at + hi - lo]))
        return [o[0] if len(o) == 1 else torch.cat(o) for o in outs]

    def _matmat(self, rows: Tensor) -> Tensor:
        if rows.shape[0] == 1 or self.batched is True:
            return self.operator.matmat(rows)
        if self.batched is False:
            return torch.cat([self.operator.matmat(r) for r in rows.split(1)])
        if self._looped is None:  # the first call: row by row, timing every row after the first
            out = [self.operator.matmat(rows[:1])]
            start = self._clock()
            out += [self.operator.matmat(r) for r in rows[1:].split(1)]
            self._looped = (self._clock() - start) / (rows.shape[0] - 1)
            return torch.cat(out)
        start = self._clock()
        out = self.operator.matmat(rows)
        self.batched = (self._clock() - start) / rows.shape[0] <= self._looped
        return out


class _Restricted(_Products):
    """Products restricted to each block: from one :class:`~lightning_landscape.functional.LossOperator` over (at
    least) all the blocks, back-propagated from its one gradient graph through what the block needs
    (:meth:`~lightning_landscape.functional.LossOperator.restricted_hvp`); where it cannot (see there), from then on
    from one operator per block (entered on ``stack``), made at the block's first product with the whole operator's
    choice of method, unchecked (the whole operator checked it).

    On a CPU the blocks' restricted products are independent backward passes through the one kept graph, so the
    blocks' Lanczos runs can go on at the same time on several threads (autograd releases the GIL; at most
    :func:`torch.get_num_interop_threads`, PyTorch's setting for work run side by side, and at most the CPUs this
    process may use; the threads are the process's own, kept from call to call: :func:`_worker_pool`). Each thread
    takes the next block (the costly early layers first) and runs it step by step, with no wait for the others;
    when no block is left to take and a thread goes idle, the others give their blocks back after their current
    step and this thread finishes them with all of torch's threads. Whether the threads are faster is measured once,
    on products needed anyway: the first block's first product runs alone, timed; if that time times the blocks
    still running is at least :data:`MIN_THREADED_STEP`, the blocks go to the threads, which stay if that block's
    next product, timed on its thread, took less than ``width`` times its time alone (``width`` threads at work:
    more products a second than one thread gets through; a slower one is timed once more before the threads stop).
    The traces' two rounds of products are measured the same way as the eigenvalues' steps used to be: the first
    round one block after another, each timed; the second on the threads, which stay if its wall time was below the
    sum of the same blocks' first times (unless the eigenvalues already decided)."""

    def __init__(
        self,
        operator: LossOperator,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        split: Mapping[str, list[str]],
        stack: contextlib.ExitStack,
        **options: Any,
    ) -> None:
        super().__init__(operator)
        self.model, self.loss_fn, self.batches, self.split, self.stack = model, loss_fn, batches, split, stack
        self.options = options
        position = {name: i for i, name in enumerate(operator.spec.names)}
        self.positions = {key: [position[n] for n in names] for key, names in split.items()}
        self.shared_graph = True  # restricted products from the whole operator's graph, until it cannot
        self.ops: dict[str, LossOperator] = {}
        self.threads = cpu_threads() if self.device.type == "cpu" else 1
        self.concurrent: bool | None = None if self.threads > 1 else False  # None: not measured yet
        self._seconds: dict[str, float] = {}  # each block's first product, run alone
        self._pool: ThreadPoolExecutor | None = None
        self.used_threads = False  # a product came from the threads

    def extra_hvps(self) -> int:
        """Products spent besides the blocks' own (the start's, choosing), the per-block operators' included."""
        return super().extra_hvps() + sum(op.probe_hvps for op in self.ops.values())

    def _operator(self, name: str) -> LossOperator:
        if name not in self.ops:
            options = dict(self.options, validate=False)
            if options["hvp_method"] == "auto":
                options["auto_method"] = self.operator.method
            self.ops[name] = self.stack.enter_context(
                LossOperator(self.model, self.loss_fn, self.batches, self.split[name], **options)
            )
        return self.ops[name]

    def block_products(self, work: Sequence[tuple[_Block, Tensor]]) -> list[Tensor]:
        """``H_jj V`` for each ``(block j, V [r, size_j])``."""
        self._choose_method()
        out = self._from_shared_graph(work) if self.shared_graph else [None] * len(work)
        for i, (block, v) in enumerate(work):
            if out[i] is None:
                self.shared_graph = False
                out[i] = self._operator(block.name).matmat(v)
        return out

    def _choose_method(self) -> None:
        """Choose and check the product method if no product did yet (no start product: traces only, or ``init``)."""
        if self.operator.method == "auto":
            self.whole(gaussian((self.size,), make_generator(None), self.dtype, self.device))

    def run_chains(self, chains: Sequence[_Chain]) -> None:
        """Advance the blocks' Lanczos runs until each is done: on several threads, each taking the next block and
        running it to its end, where measured faster (see the class docstring); else as :class:`_Products` does."""
        active = [c for c in chains if not c.done]
        if self.concurrent is None and self.shared_graph and len(active) > 1:
            for c in active:  # one step alone, timed: the first block that goes on after it is the trial block
                start = self._clock()
                c.advance(self.block_products([(c.block, c.q.unsqueeze(0))])[0][0])
                if not self.shared_graph or not c.done:
                    break
            alone, rest = self._clock() - start, [c for c in active if not c.done]
            if self.shared_graph and alone * len(rest) < MIN_THREADED_STEP:
                self.concurrent = False  # a step of these products is too quick to win back the threads' cost
            if self.concurrent is None and self.shared_graph and len(rest) > 1 and not c.done:
                self._side_by_side(rest, c, alone)
        super().run_chains(chains)  # what the threads left: after a switch back, or through per-block operators

    def _side_by_side(self, chains: list[_Chain], trial: _Chain, alone: float) -> None:
        """Run ``chains`` on the threads while every thread has one: each thread takes the next chain (in the blocks'
        order: the costly early layers first) and runs it step by step; once no chain is left to take and a thread
        goes idle, the others stop after their current step and leave their chains to the caller's thread (a long
        chain then goes on with all of torch's threads, not one thread's share). ``trial``'s next step, timed on
        its thread, decides whether the threads stay: they do if it took less than ``width`` times its step alone
        (``alone`` seconds), ``width`` being the threads that run at once, so that the threads get through more
        steps per second than one thread after another; a step above that is timed once more before the threads
        stop (one slow step is often a hiccup of the machine). An error on one thread stops the others after their
        current step."""
        width = min(self.threads, len(chains))
        pending, lock = list(reversed(chains)), threading.Lock()
        busy, looks, failed = 0, 0, False

        def go_on(c: _Chain) -> bool:
            with lock:
                full = bool(pending) or busy == width  # every thread still has a chain
            return not c.done and full and self.concurrent is not False and self.shared_graph and not failed

        def run() -> None:
            nonlocal busy, looks, failed
            while True:
                with lock:
                    if not pending or failed:
                        return
                    c = pending.pop()
                    busy += 1
                try:
                    while go_on(c):
                        start = self._clock()
                        hq = self._restricted((c.block, c.q.unsqueeze(0)))
                        if hq is None:  # from now on through per-block operators, on the caller's thread
                            self.shared_graph = False
                            return
                        self.used_threads = True
                        c.advance(hq[0])
                        if c is trial and self.concurrent is None:
                            looks += 1
                            if self._clock() - start < width * alone:
                                self.concurrent = True
                            elif looks == 2 or c.done:
                                self.concurrent = False
                    if not c.done:
                        return
                except BaseException:
                    failed = True  # the other threads stop after their current step; the caller gets the error
                    raise
                finally:
                    with lock:
                        busy -= 1

        self._on_threads([run] * width)

    def _restricted(self, item: tuple[_Block, Tensor]) -> Tensor | None:
        block, v = item
        return self.operator.restricted_hvp(v, self.positions[block.name])

    def _from_shared_graph(self, work: Sequence[tuple[_Block, Tensor]]) -> list[Tensor | None]:
        """The restricted products (``None`` where the shared graph cannot give one): one after another, or on
        several threads where measured faster (see the class docstring)."""
        if len(work) < 2 or self.concurrent is False:
            return [self._restricted(item) for item in work]
        if self.concurrent is None and not self._seconds:  # the first step: alone, each timed
            out = []
            for item in work:
                start = self._clock()
                out.append(self._restricted(item))
                self._seconds[item[0].name] = self._clock() - start
            if sum(self._seconds.values()) < MIN_THREADED_STEP:
                self.concurrent = False
            return out
        start = self._clock()
        out = self._on_threads([functools.partial(self._restricted, item) for item in work])  # (costly ones first)
        self.used_threads |= any(o is not None for o in out)
        if self.concurrent is None:
            alone = [self._seconds.get(block.name) for block, _ in work]
            if None not in alone:
                self.concurrent = self._clock() - start < sum(alone)
        return out

    def _on_threads(self, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run ``jobs`` on the process's threads (:func:`_worker_pool`), each running its operations on its share of
        torch's threads (at least one: several threads each spreading every operation over all the cores would fight
        over them); their results in order, after every job ended (the first error, if any, then raised)."""
        if self._pool is None:
            self._pool = _worker_pool(self.threads, max(1, torch.get_num_threads() // self.threads))
        futures = [self._pool.submit(job) for job in jobs]
        wait(futures)
        return [f.result() for f in futures]


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # by (threads, torch threads of each)
_POOLS_LOCK = threading.Lock()


def _worker_pool(threads: int, share: int) -> ThreadPoolExecutor:
    """The process's ``threads`` threads for the blocks' restricted products, each running its operations on
    ``share`` of torch's threads: made at first use and kept, because a thread's first autograd products are slower
    (with a new pair of threads per call the digits CNN's blocks took 1.13–1.14x the time of one thread, with kept
    ones 1.03–1.08x). One pool per ``(threads, share)`` (another call may still be using another one), none carried
    into a forked child (:func:`_forget_pools`).

    Setting a thread's number of torch threads also sets torch's default, which a thread takes at its first use of
    torch: while a pool is made its threads set theirs, then the default is put back (read before in a fresh thread,
    set again from a fresh one), so it differs only during the making of a pool, never during a measurement."""
    key = (threads, share)
    with _POOLS_LOCK:
        if key not in _POOLS:
            default = _in_fresh_thread(torch.get_num_threads)
            pool = ThreadPoolExecutor(threads, "block-products")
            ready = threading.Barrier(threads)

            def start() -> None:  # once on each of the pool's threads (all wait at the barrier: no thread runs two)
                torch.get_num_threads()  # (the thread takes torch's default first, so that the share stays)
                torch.set_num_threads(share)
                ready.wait(timeout=60)

            for future in [pool.submit(start) for _ in range(threads)]:
                future.result()
            _in_fresh_thread(lambda: (torch.get_num_threads(), torch.set_num_threads(default)))
            _POOLS[key] = pool
        return _POOLS[key]


def _in_fresh_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a new thread (which takes torch's default number of threads at its first use of torch)."""
    with ThreadPoolExecutor(1) as fresh:
        return fresh.submit(fn).result()


def _forget_pools() -> None:
    """In a forked child: the parent's threads did not come along (nor may its lock be free)."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # (no fork on Windows)
    os.register_at_fork(after_in_child=_forget_pools)


def cpu_threads() -> int:
    """Threads :func:`block_curvature` may run the blocks' restricted products on, side by side, on a CPU:
    :func:`torch.get_num_interop_threads` (set it with :func:`torch.set_num_interop_threads`), at most the CPUs this
    process may use.

    Example:
        >>> 1 <= cpu_threads() <= torch.get_num_interop_threads()
        True
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every platform)
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_interop_threads(), cpus))


class _Chain:
    """Plain Lanczos with full reorthogonalization on one block, advanced one product at a time from outside; its
    stopping rule is :func:`~lightning_landscape.functional.top_eigenvalues`'s for ``k = 1``."""

    def __init__(self, block: _Block, start: Tensor, max_steps: int, tol: float) -> None:
        self.block, self.tol = block, tol
        self.cap = min(max_steps, block.size)
        self.basis = torch.empty(self.cap, block.size, dtype=start.dtype, device=start.device)
        self.q = start / torch.linalg.vector_norm(start)
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.m = 0
        self.done = self.converged = False
        self.previous = math.inf
        self.scale = 0.0
        self.eigh: tuple[Tensor, Tensor] | None = None
        self._w: Tensor | None = None

    def absorb(self, hq: Tensor) -> Tensor:
        """Take ``H_jj q`` for the current ``q``; returns ``(α, β)`` (a 2-vector, on the device) for :meth:`decide`."""
        basis = self.basis[: self.m + 1]
        basis[self.m] = self.q
        c = hq.unsqueeze(0) @ basis.T  # [1, m + 1]: the last entry is α
        w = hq.unsqueeze(0) - c @ basis
        w = w - (w @ basis.T) @ basis  # twice is enough (CGS2)
        self._w = w[0]
        return torch.stack([c[0, -1].double(), torch.linalg.vector_norm(w[0], dtype=torch.float64)])

    def decide(self, alpha: float, beta: float) -> None:
        """Record the step (``α``, ``β`` as floats) and decide whether the block is done."""
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise MeasurementError(
                f"block {self.block.name!r}: a non-finite Hessian-vector product (NaN or inf) at its Lanczos step "
                f"{self.m + 1}: the loss has no finite second derivatives in this block at these weights."
            )
        self.m += 1
        self.alpha.append(alpha)
        self.scale = max(self.scale, abs(alpha), beta)
        invariant = beta <= DEFLATION_TOL * torch.finfo(self.basis.dtype).eps * self.scale
        m = self.m
        t = torch.diag(torch.tensor(self.alpha, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.beta, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = self.eigh = torch.linalg.eigh(t)
        top = float(theta[-1])
        r = 0.0 if invariant else beta * abs(float(s[-1, -1]))
        gap = float(theta[-1] - theta[-2]) if m > 1 else math.inf
        bound = min(r, r * r / max(gap, 1e-300))
        change = abs(top - self.previous) if math.isfinite(self.previous) else math.inf
        self.previous = top
        c = max(abs(top), self.tol * float(theta.abs().max()))
        self.converged = r <= self.tol * c or (max(bound, change) <= self.tol * c and r <= 3 * self.tol * c)
        self.done = self.converged or invariant or m == self.cap
        if not self.done:
            self.beta.append(beta)
            self.q = self._w / beta
        self._w = None

    def advance(self, hq: Tensor) -> None:
        """:meth:`absorb` then :meth:`decide`: one whole step (its two numbers reach the host at once)."""
        alpha, beta = self.absorb(hq).tolist()
        self.decide(alpha, beta)

    def vector(self) -> Tensor:
        """The unit Ritz vector of the top Ritz value."""
        s = self.eigh[1][:, -1].to(self.basis)
        v = s @ self.basis[: self.m]
        return v / torch.linalg.vector_norm(v)


def _starts(
    products: _Products, blocks: list[_Block], generator: torch.Generator, init: Tensor | None = None
) -> list[Tensor]:
    """Each block's start: its unit part of ``init`` or else of ``H z`` (``z`` Gaussian over all blocks, one
    product) plus :data:`START_NOISE` times a random unit vector (the random vector alone where that part is zero)."""
    dtype, device = products.dtype, products.device
    if init is None:
        hz = products.whole(gaussian((products.size,), generator, dtype, device)).unsqueeze(0)
    else:
        hz = init.reshape(1, -1).to(device=device, dtype=dtype)
    starts = []
    for b in blocks:
        noise = gaussian((b.size,), generator, dtype, device)
        noise = noise / torch.linalg.vector_norm(noise)
        part = b.gather(hz)[0]
        norm = torch.linalg.vector_norm(part)
        starts.append(torch.where(torch.isfinite(norm) & (norm > 0), part / norm + START_NOISE * noise, noise))
    return starts


def _top_eigenvalues(
    products: _Products,
    blocks: list[_Block],
    tol: float,
    max_hvps: int,
    generator: torch.Generator,
    init: Tensor | None = None,
) -> list[_Chain]:
    starts = _starts(products, blocks, generator, init)
    chains = [_Chain(b, q, max_hvps, tol) for b, q in zip(blocks, starts, strict=True)]
    products.run_chains(chains)
    return chains


def _traces(
    products: _Products, blocks: list[_Block], samples: int, generator: torch.Generator
) -> list[tuple[float, float, int]]:
    """``(trace, stderr, products)`` per block: exact from unit vectors when ``size <= samples``, else Hutch++ with
    ``samples // 3`` sketch vectors, as many for the sketch's exact part and the rest Hutchinson (Rademacher) probes
    projected off the sketch. Two batched rounds for all blocks: the sketches (and the unit vectors), then the
    sketch bases with the probes."""
    dtype, device = products.dtype, products.device
    exact = [b for b in blocks if b.size <= samples]
    hutch = [b for b in blocks if b.size > samples]
    sketch = samples // 3
    first = [(b, torch.eye(b.size, dtype=dtype, device=device)) for b in exact]
    first += [(b, rademacher((sketch, b.size), generator, dtype, device)) for b in hutch]
    out1 = products.block_products(first)
    results: dict[str, tuple[float, float, int]] = {}
    for b, hv in zip(exact, out1, strict=False):
        results[b.name] = (float(hv.diagonal().sum(dtype=torch.float64)), 0.0, b.size)
    second, bases = [], []
    for b, y in zip(hutch, out1[len(exact) :], strict=True):
        q = torch.linalg.qr(y.T).Q.T.contiguous()  # [sketch, size], orthonormal rows spanning H_jj S
        g = rademacher((samples - 2 * sketch, b.size), generator, dtype, device)
        g = g - (g @ q.T) @ q
        bases.append(q)
        second.append((b, torch.cat([q, g])))
    for (b, rows), q, hv in zip(second, bases, products.block_products(second), strict=True):
        forms = (rows * hv).sum(dim=1, dtype=torch.float64)
        top, rest = forms[: q.shape[0]].sum(), forms[q.shape[0] :]
        tests = rest.numel()
        stderr = float(rest.std() / math.sqrt(tests)) if tests > 1 else math.nan
        results[b.name] = (float(top + rest.mean()), stderr, samples)
    return [results[b.name] for b in blocks]


def _check_arguments(eigenvalues: bool, trace: bool, tol: float, max_hvps: int, trace_samples: int) -> None:
    if not (eigenvalues or trace):
        raise ValueError("`eigenvalues` and `trace` are both False: nothing to compute.")
    if tol <= 0:
        raise ValueError(f"`tol` must be > 0, got {tol}.")
    if max_hvps < 1:
        raise ValueError(f"`max_hvps` must be >= 1 (products per block), got {max_hvps}.")
    if trace and trace_samples < 3:
        raise ValueError(
            f"`trace_samples` must be >= 3 (Hutch++ needs a sketch, its basis and a probe), got {trace_samples}."
        )


def block_estimates(
    operator: SymmetricOperator,
    blocks: Mapping[str, Sequence[int] | Tensor],
    *,
    eigenvalues: bool = True,
    trace: bool = True,
    eigenvectors: bool = False,
    tol: float = 1e-3,
    max_hvps: int = 100,
    trace_samples: int = 30,
    generator: torch.Generator | None = None,
) -> BlockResult:
    """Top eigenvalue and trace of the diagonal blocks ``H_jj`` of a symmetric ``operator``.

    ``blocks`` maps a name to the block's columns (indices into the operator's flat vectors; blocks may overlap
    here). For the eigenvalues, one plain Lanczos run per block (full reorthogonalization within the block, started
    from the block's part of ``H z`` plus :data:`START_NOISE` times a random unit vector, ``z`` Gaussian: one
    product for all blocks; :func:`~lightning_landscape.functional.top_eigenvalues`'s stopping rule for ``k = 1`` with
    ``tol``, at most ``max_hvps`` products per block) advances in lockstep with the others: each step is one product
    call for the still-running blocks' vectors (zero outside their block), batched or row by row, whichever was
    faster per row when measured on the first two calls. Traces: exact from the unit vectors for a block of at most
    ``trace_samples`` parameters, else Hutch++ with ``trace_samples`` products (see
    :func:`~lightning_landscape.functional.trace_estimate`), all blocks' probes in two rounds.

    Example:
        >>> from lightning_landscape.functional import DenseOperator
        >>> a = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 5.0], [0.0, 5.0, -1.0]])
        >>> r = block_estimates(DenseOperator(a.double()), {"first": [0, 1], "last": [2]}, tol=1e-8)
        >>> {k: round(v, 4) for k, v in r.eigenvalues.items()}, r.traces
        ({'first': 3.618, 'last': -1.0}, {'first': 5.0, 'last': -1.0})
    """
    start = time.perf_counter()
    space = getattr(operator, "space", EUCLIDEAN)
    if space.distributed:
        raise NotImplementedError("per-block curvature does not support sharded (FSDP2) operators yet.")
    if not isinstance(blocks, Mapping) or not blocks:
        raise ValueError(f"`blocks` must be a non-empty mapping {{name: columns}}, got {blocks!r}.")
    _check_arguments(eigenvalues, trace, tol, max_hvps, trace_samples)
    parts = [_Block.from_columns(name, cols, operator.size) for name, cols in blocks.items()]
    result = _estimate(
        _Shared(operator), parts, eigenvalues, trace, eigenvectors, tol, max_hvps, trace_samples, generator
    )
    result.seconds = time.perf_counter() - start
    return result


def _estimate(
    products: _Products,
    parts: list[_Block],
    eigenvalues: bool,
    trace: bool,
    eigenvectors: bool,
    tol: float,
    max_hvps: int,
    trace_samples: int,
    generator: torch.Generator | None,
    init: Tensor | None = None,
) -> BlockResult:
    generator = make_generator(generator)
    result = BlockResult(blocks={}, sizes={b.name: b.size for b in parts})
    result.num_hvps = {b.name: 0 for b in parts}
    if eigenvalues:
        for c in _top_eigenvalues(products, parts, tol, max_hvps, generator, init):
            name = c.block.name
            result.eigenvalues[name] = float(c.eigh[0][-1])
            result.converged[name] = c.converged
            result.num_hvps[name] += c.m
            if eigenvectors:
                result.eigenvectors[name] = c.vector()
    if trace:
        for b, (value, stderr, used) in zip(parts, _traces(products, parts, trace_samples, generator), strict=True):
            result.traces[b.name], result.trace_stderr[b.name] = value, stderr
            result.num_hvps[b.name] += used
    result.total_hvps = sum(result.num_hvps.values()) + products.extra_hvps()
    result.hvp_method = products.method
    result.rows_batched = getattr(products, "batched", None)
    result.threads = products.threads if getattr(products, "used_threads", False) else 1
    return result


def block_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    blocks: str | Mapping[str, ParamsArg] = "module",
    *,
    eigenvalues: bool = True,
    trace: bool = True,
    eigenvectors: bool = False,
    tol: float = 1e-3,
    max_hvps: int = 100,
    trace_samples: int = 30,
    generator: torch.Generator | None = None,
    hvp_method: str = "auto",
    eval_mode: bool = True,
    products: str = "auto",
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
    operator: LossOperator | None = None,
    init: Tensor | None = None,
) -> BlockResult:
    """Top Hessian eigenvalue and trace of every parameter block of ``model``, computed together.

    The blocks' Lanczos runs start from their parts of one whole product ``H z`` and advance together (in lockstep,
    see :func:`block_estimates`, or each at its own pace on CPU threads, see the module's docstring) and their trace
    probes go in two rounds; the products come from one operator over all the blocks, masked rows batched or each
    restricted to its block (``products``); either way one gradient graph serves all blocks and the product method
    is chosen and checked once.

    Args:
        model: any ``nn.Module``; left exactly as it was.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batches: probe batches; the loss is their sample-weighted mean.
        blocks: how to split the parameters (see :func:`split_blocks`): ``"module"``, ``"layer"``, ``"parameter"``,
            or a mapping ``{block name: params}``.
        eigenvalues: compute each block's top eigenvalue.
        trace: compute each block's trace.
        eigenvectors: keep each block's top eigenvector (in :attr:`BlockResult.eigenvectors`).
        tol: relative eigenvalue error to stop at.
        max_hvps: product budget of each block's eigenvalue.
        trace_samples: products per block for its trace (exact for blocks no larger).
        generator: source of the random start vectors and probes.
        hvp_method: see :data:`~lightning_landscape.functional.HVP_METHODS`.
        eval_mode: measure in eval mode.
        products: where the products come from (see :data:`PRODUCT_SOURCES` and the module's docstring):
            ``"shared"`` (one operator over all blocks, their rows batched), ``"per_block"`` (each product
            restricted to its block, from one shared gradient graph) or ``"auto"`` (``"per_block"`` on a CPU,
            else ``"shared"``).
        reduce_fn: sums a tensor over processes (DDP: every process holds its own probe batches; the products
            and losses are then the sample-weighted means over all of them, as ``LossOperator``'s ``reduce_fn``).
        operator: an open :class:`~lightning_landscape.functional.LossOperator` of ``model``, ``loss_fn`` and
            ``batches`` over (at least) the blocks' parameters, e.g. the one a whole-model measurement just used:
            its gradient graph and its checked product method serve the blocks (left open; ``loss_fn``,
            ``batches``, ``hvp_method``, ``eval_mode`` and ``reduce_fn`` then only set up any per-block operator it
            cannot replace, so they must be the operator's own).
        init: a vector over ``operator``'s parameters (over the blocks' parameters in the model's order without
            one), e.g. the whole model's top eigenvector (``[n]``, or ``[m, n]``: its first row): the blocks' runs
            start from their parts of it instead of ``H z`` (one product less, and closer when the blocks' top
            eigenvectors lean the same way).

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> data = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
        >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> r = block_curvature(model, loss_fn, data, "layer")
        >>> list(r.eigenvalues), all(r.converged.values()), r.sizes
        (['0', '2'], True, {'0': 16, '2': 10})
    """
    start = time.perf_counter()
    if is_sharded(model):
        raise NotImplementedError("block_curvature does not support sharded (FSDP2) models yet.")
    if products not in PRODUCT_SOURCES:
        raise ValueError(f"`products` must be one of {PRODUCT_SOURCES}, got {products!r}.")
    _check_arguments(eigenvalues, trace, tol, max_hvps, trace_samples)
    split = split_blocks(model, blocks)
    if products == "auto":
        device = next(p.device for p in model.parameters() if p.requires_grad)
        products = "per_block" if device.type == "cpu" else "shared"
    options = {"hvp_method": hvp_method, "eval_mode": eval_mode, "reduce_fn": reduce_fn}
    estimate = functools.partial(
        _estimate,
        eigenvalues=eigenvalues,
        trace=trace,
        eigenvectors=eigenvectors,
        tol=tol,
        max_hvps=max_hvps,
        trace_samples=trace_samples,
        generator=generator,
    )
    with contextlib.ExitStack() as stack:
        op = operator
        if op is None:
            op = stack.enter_context(LossOperator(model, loss_fn, batches, _union(model, split), **options))
        _check_operator(op, model, split, init, given=operator is not None)
        if products == "per_block":
            source: _Products = _Restricted(op, model, loss_fn, batches, split, stack, **options)
        else:
            source = _Shared(op)
        at = dict(zip(op.spec.names, itertools.accumulate([0, *op.spec.sizes]), strict=False))
        size = dict(zip(op.spec.names, op.spec.sizes, strict=True))
        parts = [_Block(key, _merge([(at[n], at[n] + size[n]) for n in names])) for key, names in split.items()]
        result = estimate(source, parts, init=None if init is None else init.reshape(-1, op.size)[0])
    result.blocks = split
    result.seconds = time.perf_counter() - start
    return result


def _check_operator(
    operator: object, model: nn.Module, split: Mapping[str, list[str]], init: Tensor | None, given: bool
) -> None:
    """A ``ValueError`` naming ``operator`` or ``init`` when they do not fit the blocks (``given``: the caller's
    operator, else the one made over the blocks' parameters)."""
    if not isinstance(operator, LossOperator):
        raise ValueError(f"`operator` must be an open LossOperator of the model, got {type(operator).__name__}.")
    if operator.model is not model:
        raise ValueError("`operator` was built on another model: open it on `model`.")
    if not operator.is_open:
        raise ValueError("`operator` must be open: call block_curvature inside `with LossOperator(...) as operator:`.")
    missing = missing_parameters(operator, split)
    if missing:
        raise ValueError(f"`operator` does not hold the blocks' parameters {missing[:3]}: open it over all of them.")
    if init is not None and (init.dim() not in (1, 2) or init.shape[-1] != operator.size):
        whose = "the operator's parameters" if given else "the blocks' parameters, in the model's order"
        raise ValueError(
            f"`init` must have shape [{operator.size}] or [m, {operator.size}] ({whose}), got {tuple(init.shape)}."
        )


def missing_parameters(operator: LossOperator, split: Mapping[str, list[str]]) -> list[str]:
    """The blocks' parameter names ``operator`` does not hold (``[]``: it can serve ``block_curvature(operator=)``).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> with LossOperator(net, lambda m, b: m(b).sum(), [torch.ones(1, 2)], params="0.*") as op:
        ...     missing_parameters(op, split_blocks(net, "layer"))
        ['1.weight', '1.bias']
    """
    held = set(operator.spec.names)
    return [n for names in split.values() for n in names if n not in held]


def _union(model: nn.Module, split: Mapping[str, list[str]]) -> list[str]:
    """The blocks' parameter names, in the model's order."""
    chosen = {n for names in split.values() for n in names}
    return [n for n, _ in model.named_parameters() if n in chosen]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``(start, stop)`` ranges with touching ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
