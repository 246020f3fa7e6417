"""Per-block curvature (functional/blocks.py) and the gradient's share in the top eigenspace (functional/overlap.py),
against dense float64 Hessians of an MLP, a CNN with BatchNorm (eval mode) and a tiny transformer."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from _models import dense_hessian
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_landscape.functional import LossOperator, top_eigenvalues
from lightning_landscape.functional import blocks as blocks_module
from lightning_landscape.functional._operator import DenseOperator
from lightning_landscape.functional.blocks import block_curvature, block_estimates, split_blocks
from lightning_landscape.functional.overlap import gradient_overlap, hessian_gradient_overlap

# With tol=1e-8 in float64 the Lanczos stopping rule bounds each top eigenvalue's error by ~1e-8·|λ| (residual or
# gap bound); 1e-4 relative (the figure) leaves four orders of magnitude for rounding.
EIG_RTOL = 1e-4


class _Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def mlp() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    return model.double(), [(torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,)))]


def cnn() -> tuple[nn.Module, list]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Conv2d(3, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
    ).double()
    with torch.no_grad():  # BatchNorm with running statistics that are not the identity (eval mode reads them)
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model, [(torch.randn(24, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (24,)))]


def transformer() -> tuple[nn.Module, list]:
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, _Pool(), nn.Linear(8, 3)).double()
    return model, [(torch.randn(8, 5, 8, dtype=torch.float64), torch.randint(0, 3, (8,)))]


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def exact_hessian(model: nn.Module, batches: list) -> torch.Tensor:
    """The dense float64 Hessian (the math attention backend: the fused CPU kernel has no double backward)."""
    with sdpa_kernel(SDPBackend.MATH):
        return dense_hessian(model, loss_fn, batches)


def columns(model: nn.Module, names: list[str]) -> torch.Tensor:
    """The flat indices of ``names`` among all parameters (the dense Hessian's order)."""
    out, at = [], 0
    for n, p in model.named_parameters():
        if n in names:
            out.append(torch.arange(at, at + p.numel()))
        at += p.numel()
    return torch.cat(out)


@pytest.mark.parametrize(
    ("make", "by", "products"),
    [
        (mlp, "layer", "shared"),
        (mlp, "parameter", "per_block"),
        (cnn, "layer", "shared"),
        (cnn, "layer", "per_block"),
        (transformer, "layer", "shared"),
        (transformer, "layer", "per_block"),
    ],
)
def test_block_eigenvalues_and_traces_match_dense_hessian(make, by, products):
    model, batches = make()
    h = exact_hessian(model, batches)
    blocks = split_blocks(model, by)
    largest = max(h[columns(model, names)].shape[0] for names in blocks.values())
    r = block_curvature(
        model, loss_fn, batches, by, tol=1e-8, trace_samples=largest, eigenvectors=True, products=products
    )
    assert list(r.eigenvalues) == list(blocks) and r.blocks == blocks
    for name, names in blocks.items():
        idx = columns(model, names)
        hjj = h[idx][:, idx]
        values, vectors = torch.linalg.eigh(hjj)
        assert r.sizes[name] == len(idx)
        assert r.converged[name], name
        assert r.eigenvalues[name] == pytest.approx(float(values[-1]), rel=EIG_RTOL, abs=1e-12), name
        # trace_samples >= every block's size: the trace is exact from unit vectors (float64 rounding only)
        assert r.traces[name] == pytest.approx(float(hjj.trace()), rel=1e-9, abs=1e-12), name
        assert r.trace_stderr[name] == 0.0
        if float(values[-1] - values[-2]) > 1e-3 * abs(float(values[-1])):  # a simple top eigenvalue: its vector
            v = r.eigenvectors[name].double()
            assert abs(float(v @ vectors[:, -1])) == pytest.approx(1.0, abs=1e-4), name
            assert float((hjj @ v - r.eigenvalues[name] * v).norm()) <= 1e-4 * abs(r.eigenvalues[name])
    assert r.total_hvps >= sum(r.num_hvps.values())  # (+ the product auto may spend choosing its method)


def test_module_blocks_of_the_transformer_with_hutchpp_traces():
    model, batches = transformer()
    h = exact_hessian(model, batches)
    blocks = {"attention": "0.self_attn.*", "feedforward": ["0.linear1.*", "0.linear2.*"], "head": model[2]}
    r = block_curvature(model, loss_fn, batches, blocks, tol=1e-8, trace_samples=60)
    for name, names in r.blocks.items():
        idx = columns(model, names)
        hjj = h[idx][:, idx]
        assert r.eigenvalues[name] == pytest.approx(float(torch.linalg.eigvalsh(hjj)[-1]), rel=EIG_RTOL), name
        exact = float(hjj.trace())
        if len(idx) <= 60:
            assert r.traces[name] == pytest.approx(exact, rel=1e-9)
        else:  # Hutch++ is unbiased; its error is that of the Hutchinson part: 4 standard errors (seeded)
            assert r.num_hvps[name] > 60 and abs(r.traces[name] - exact) <= 4 * r.trace_stderr[name], name
    assert r.sizes == {"attention": 288, "feedforward": 212, "head": 27}


def test_hutchpp_block_traces_are_within_their_standard_error():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64))
    a = q @ torch.diag(100.0 / torch.arange(1, 121, dtype=torch.float64) ** 2) @ q.T  # a decaying spectrum
    blocks = {"first": range(0, 70), "second": range(70, 120), "odd": range(1, 120, 2)}  # (may overlap here)
    r = block_estimates(DenseOperator(a), blocks, eigenvalues=False, trace_samples=30)
    for name, cols in blocks.items():
        idx = torch.tensor(list(cols))
        exact = float(a[idx][:, idx].trace())
        # Hutch++ is unbiased and its only error is the Hutchinson part's: 4 of its standard errors (seeded run)
        assert 0 < r.trace_stderr[name] and abs(r.traces[name] - exact) <= 4 * r.trace_stderr[name], name
        # the 10-vector sketch holds most of a decaying spectrum: the estimate is far better than Hutchinson's
        assert abs(r.traces[name] - exact) <= 0.05 * exact
        assert r.num_hvps[name] == 30


def test_batched_blocks_agree_with_one_run_per_block():
    model, batches = mlp()
    together = block_curvature(model, loss_fn, batches, "parameter", tol=1e-8, trace=False, products="shared")
    restricted = block_curvature(model, loss_fn, batches, "parameter", tol=1e-8, trace=False, products="per_block")
    # the same random starts and the same products up to rounding: the same Lanczos steps, block by block
    assert restricted.num_hvps == together.num_hvps
    for name, names in together.blocks.items():
        alone = block_curvature(model, loss_fn, batches, {name: names}, tol=1e-8, trace=False)
        # converged runs (from other random starts alone): each within ~1e-8 relative of the same eigenvalue
        assert alone.eigenvalues[name] == pytest.approx(together.eigenvalues[name], rel=1e-6), name
        assert restricted.eigenvalues[name] == pytest.approx(together.eigenvalues[name], rel=1e-6), name
    # batching saves calls, not products: each row counted once, and never more than a block's size
    assert all(together.num_hvps[n] <= together.sizes[n] for n in together.blocks)


def test_restricted_hvp_is_the_dense_hessian_block_over_several_probe_batches():
    model, (batch,) = cnn()
    batches = [(batch[0][:10], batch[1][:10]), (batch[0][10:], batch[1][10:])]  # sample-weighted: 10 and 14
    h = exact_hessian(model, batches)
    with LossOperator(model, loss_fn, batches) as op:
        assert op.restricted_hvp(torch.ones(1, op.spec.sizes[0]), [0]) is None  # the method is not chosen yet
        op.hvp(torch.ones(1, op.size, dtype=torch.float64))
        names = op.spec.names
        for params in ([0], [2, 3], [len(names) - 2, len(names) - 1], [1, 4]):
            idx = columns(model, [names[j] for j in params])
            v = torch.randn(3, len(idx), dtype=torch.float64, generator=torch.Generator().manual_seed(len(params)))
            hv = op.restricted_hvp(v, params)  # three rows: one batched backward
            assert hv.shape == v.shape
            assert torch.allclose(hv, v @ h[idx][:, idx], rtol=1e-10, atol=1e-12), params
            one = op.restricted_hvp(v[:1], params)  # one row: its own backward
            assert torch.allclose(one, hv[:1], rtol=1e-10, atol=1e-12), params
        with pytest.raises(ValueError, match=r"`vectors` must have shape \[k, 27\]"):
            op.restricted_hvp(torch.ones(1, 5), [0])  # the first convolution's weight: 27 entries


def test_restricted_hvp_gives_way_where_the_operator_cannot():
    model, batches = mlp()
    with LossOperator(model, loss_fn, batches, hvp_method="finite_difference") as op:
        op.hvp(torch.ones(1, op.size, dtype=torch.float64))
        assert op.restricted_hvp(torch.ones(1, op.spec.sizes[0], dtype=torch.float64), [0]) is None
    with LossOperator(model, loss_fn, batches, reduce_fn=lambda t: t) as op:  # rows to reduce over processes
        op.hvp(torch.ones(1, op.size, dtype=torch.float64))
        assert op.restricted_hvp(torch.ones(1, op.spec.sizes[0], dtype=torch.float64), [0]) is None


def test_restricted_products_out_of_memory_give_the_graph_back_and_fall_back(monkeypatch):
    model, batches = cnn()
    h = exact_hessian(model, batches)
    calls = []

    def out_of_memory(self, graph, params, seeds):
        calls.append(params)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(LossOperator, "_restricted_part", out_of_memory)
    with LossOperator(model, loss_fn, batches) as op:
        op.hvp(torch.ones(1, op.size, dtype=torch.float64))
        assert op._graphs  # the kept graph, before
        assert op.restricted_hvp(torch.ones(1, op.spec.sizes[0], dtype=torch.float64), [0]) is None
        assert not op._graphs and not op.cache_graph  # given back, and no more kept
    r = block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace=False, products="per_block")
    assert len(calls) == 2  # one try each time: then the blocks' own operators
    for name, names in r.blocks.items():
        idx = columns(model, names)
        assert r.eigenvalues[name] == pytest.approx(float(torch.linalg.eigvalsh(h[idx][:, idx])[-1]), rel=EIG_RTOL)


def test_per_block_products_share_one_gradient_graph(monkeypatch):
    model, batches = cnn()
    h = exact_hessian(model, batches)
    opened = []
    original = LossOperator.__init__

    def spy(self, *args, **kwargs):
        opened.append(kwargs.get("params", args[3] if len(args) > 3 else None))
        original(self, *args, **kwargs)

    monkeypatch.setattr(LossOperator, "__init__", spy)
    r = block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace_samples=84, products="per_block")
    assert len(opened) == 1  # one operator, one kept graph, for all the blocks
    fd = block_curvature(
        model, loss_fn, batches, "layer", tol=1e-6, trace=False, products="per_block", hvp_method="finite_difference"
    )
    assert len(opened) == 2 + len(r.blocks)  # no graph to share: one operator per block, as the fallback
    assert fd.hvp_method == "finite_difference"
    for name, names in r.blocks.items():
        idx = columns(model, names)
        top = float(torch.linalg.eigvalsh(h[idx][:, idx])[-1])
        assert r.eigenvalues[name] == pytest.approx(top, rel=EIG_RTOL), name
        assert r.traces[name] == pytest.approx(float(h[idx][:, idx].trace()), rel=1e-9), name  # exact: unit vectors
        assert fd.eigenvalues[name] == pytest.approx(top, rel=1e-4), name  # float64 central differences
    # the blocks' own products and the start's whole product (H z), which also chose the method
    assert r.total_hvps == sum(r.num_hvps.values()) + 1


def _record_products(monkeypatch, delay) -> list[tuple[str, str, bool]]:
    """Every restricted product as ``(phase, block, ran on the main thread)``, in the order they ended, each after
    sleeping ``delay(block, on_main)`` seconds (a sleep frees the GIL, as autograd's work does)."""
    original, original_traces, seen, phase = blocks_module._Restricted._restricted, blocks_module._traces, [], ["eig"]

    def slow(self, item):
        on_main = threading.current_thread() is threading.main_thread()
        delay(item[0].name, on_main)
        out = original(self, item)
        seen.append((phase[0], item[0].name, on_main))
        return out

    def traces(*args):
        phase[0] = "trace"
        return original_traces(*args)

    monkeypatch.setattr(blocks_module._Restricted, "_restricted", slow)
    monkeypatch.setattr(blocks_module, "_traces", traces)
    return seen


@pytest.mark.parametrize("faster", [True, False])
def test_the_blocks_run_side_by_side_on_threads_where_measured_faster(monkeypatch, faster):
    """The first block's first product runs alone, timed; then the blocks go to two threads. Faster (every product
    sleeps as long): they stay there until a thread runs out of blocks, and the traces' rounds go there too. Slower
    (the threads queue behind one lock and sleep ten times as long): after the first block's next two products on
    the threads, everything comes back to this thread. The same numbers either way."""
    model, batches = cnn()
    h = exact_hessian(model, batches)
    alone = block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace_samples=84, products="per_block")
    assert alone.threads == 1 or blocks_module.cpu_threads() > 1
    monkeypatch.setattr(blocks_module, "cpu_threads", lambda: 2)
    queue = threading.Lock()

    def delay(block: str, on_main: bool) -> None:
        if faster:
            time.sleep(0.02)
        else:
            with queue:
                time.sleep(0.02 if on_main else 0.2)

    seen = _record_products(monkeypatch, delay)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # each of the two threads runs its operations on one: the default is put back after
    try:
        r = block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace_samples=84, products="per_block")
        with ThreadPoolExecutor(1) as fresh:  # a thread started afterwards takes torch's default
            assert fresh.submit(torch.get_num_threads).result() == 2
    finally:
        torch.set_num_threads(before)
    assert r.threads == 2  # (some products ran there either way)
    eig = [(block, on_main) for phase, block, on_main in seen if phase == "eig"]
    first = next(iter(r.blocks))
    assert eig[0] == (first, True)  # the trial: alone
    on_main = [m for _, m in eig[1:]]
    back = on_main.index(True) if True in on_main else len(on_main)
    assert not any(on_main[:back]) and all(on_main[back:])  # threads, then (hand-back or switch) this thread only
    first_on_threads = [m for b, m in eig[1:] if b == first][:2]
    if faster:
        assert back >= len(r.blocks) and not any(first_on_threads)
        assert not all(m for phase, _, m in seen if phase == "trace")  # (its second round on the threads)
    else:
        assert sum(not m for b, m in eig[1:] if b == first) <= 2  # two looks at most
        assert all(m for phase, _, m in seen if phase == "trace")
    for name, names in r.blocks.items():  # the same numbers either way
        idx = columns(model, names)
        assert r.eigenvalues[name] == pytest.approx(alone.eigenvalues[name], rel=1e-12, abs=1e-12)
        assert r.eigenvalues[name] == pytest.approx(float(torch.linalg.eigvalsh(h[idx][:, idx])[-1]), rel=EIG_RTOL)
        assert r.traces[name] == pytest.approx(float(h[idx][:, idx].trace()), rel=1e-9)


def test_a_block_left_alone_on_the_threads_comes_back_to_the_caller(monkeypatch):
    """Two blocks, the first one slow: once the other thread finished the quick block and has none to take, the slow
    block's run comes back to this thread after its current step (and goes on with all of torch's threads there)."""
    model, batches = cnn()
    h = exact_hessian(model, batches)
    monkeypatch.setattr(blocks_module, "cpu_threads", lambda: 2)
    blocks = {"slow": "0.*", "quick": "6.*"}
    seen = _record_products(monkeypatch, lambda block, on_main: time.sleep(0.05 if block == "slow" else 0.001))
    r = block_curvature(model, loss_fn, batches, blocks, tol=1e-8, trace=False, products="per_block")
    slow = [m for _, b, m in seen if b == "slow"]
    assert r.num_hvps["slow"] >= 4 and slow[0] and not slow[1] and all(slow[2:])  # alone, one on a thread, back
    assert r.threads == 2 and not any(m for _, b, m in seen if b == "quick")
    for name, names in r.blocks.items():
        idx = columns(model, names)
        assert r.eigenvalues[name] == pytest.approx(float(torch.linalg.eigvalsh(h[idx][:, idx])[-1]), rel=EIG_RTOL)


def test_the_threads_are_kept_from_call_to_call_and_made_anew_in_a_forked_child(monkeypatch):
    """A thread's first autograd products are slower: the process keeps its threads (the same ones serve the next
    call); another number of threads, or another process (a fork: threads do not survive it), get new ones."""
    model, batches = cnn()
    monkeypatch.setattr(blocks_module, "cpu_threads", lambda: 2)
    monkeypatch.setattr(blocks_module, "MIN_THREADED_STEP", 0.0)
    idents: list[set[int]] = []  # the threads of each call's products
    _record_products(monkeypatch, lambda block, on_main: idents[-1].add(threading.get_ident()))
    for _ in range(2):
        idents.append(set())
        block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace=False, products="per_block")
    names = [s - {threading.main_thread().ident} for s in idents]
    assert names[0] and names[1] <= names[0]  # the second call's threads are the first call's
    pool = blocks_module._worker_pool(2, 1)
    assert blocks_module._worker_pool(2, 1) is pool and blocks_module._worker_pool(3, 1) is not pool
    assert blocks_module._worker_pool(2, 2) is not pool and blocks_module._worker_pool(2, 1) is pool  # (kept)
    if hasattr(os, "fork"):  # a forked child starts without the parent's pools (it only looks, and leaves)
        child = os.fork()
        if child == 0:
            os._exit(0 if not blocks_module._POOLS else 1)
        assert os.waitpid(child, 0)[1] == 0
    blocks_module._forget_pools()  # (what the child ran)
    assert blocks_module._worker_pool(2, 1) is not pool


def test_threads_put_back_torch_default_not_the_callers_own_setting(monkeypatch):
    """A caller thread started under one default (its own setting stays) runs the blocks after the default changed:
    threads started afterwards get the new default, not the caller's."""
    model, batches = cnn()
    monkeypatch.setattr(blocks_module, "cpu_threads", lambda: 2)
    monkeypatch.setattr(blocks_module, "MIN_THREADED_STEP", 0.0)  # always try the threads
    before = torch.get_num_threads()
    ready, go = threading.Event(), threading.Event()

    def caller() -> tuple[int, int]:
        torch.get_num_threads()  # this thread takes the default of now: 2
        ready.set()
        go.wait()
        r = block_curvature(model, loss_fn, batches, "layer", tol=1e-6, trace=False, products="per_block")
        return r.threads, torch.get_num_threads()

    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(1) as other:
            future = other.submit(caller)
            ready.wait()
            torch.set_num_threads(1)  # the default now: 1
            go.set()
            threads, its_own = future.result()
        with ThreadPoolExecutor(1) as fresh:
            assert fresh.submit(torch.get_num_threads).result() == 1  # the default, as the main thread left it
        assert its_own == 2 and torch.get_num_threads() == 1
        assert threads in (1, 2)  # (whichever measured faster: not the point here)
    finally:
        torch.set_num_threads(before)


def test_torch_default_stays_during_calls_and_after_two_at_once(monkeypatch):
    """The threads' own settings must not leak into torch's default, which a thread takes at its first use of torch:
    threads started during a call, and after calls on two models at once, get the default (two calls at once used
    to read each other's setting as the default and put that back for good)."""
    monkeypatch.setattr(blocks_module, "cpu_threads", lambda: 2)
    monkeypatch.setattr(blocks_module, "MIN_THREADED_STEP", 0.0)
    (a, batches_a), (b, batches_b) = cnn(), mlp()
    during: list[int] = []

    def spy(block: str, on_main: bool) -> None:
        if not on_main and len(during) < 5:
            with ThreadPoolExecutor(1) as fresh:  # a thread other code starts during the call
                during.append(fresh.submit(torch.get_num_threads).result())

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        block_curvature(a, loss_fn, batches_a, "layer", tol=1e-6, trace=False)  # (the threads exist from here on)
        _record_products(monkeypatch, spy)
        r = block_curvature(a, loss_fn, batches_a, "layer", tol=1e-6, trace=False)
        assert r.threads == 2 and during and set(during) == {2}
        for _ in range(5):
            with ThreadPoolExecutor(2) as two:
                calls = [
                    two.submit(block_curvature, m, loss_fn, d, "layer", tol=1e-6, trace=False)
                    for m, d in ((a, batches_a), (b, batches_b))
                ]
                assert all(c.result(timeout=120).eigenvalues for c in calls)
            with ThreadPoolExecutor(1) as fresh:
                assert fresh.submit(torch.get_num_threads).result() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_error_on_a_thread_reaches_the_caller_after_the_threads_stopped(monkeypatch):
    """A Lanczos step failing on one thread: the error is the caller's, raised once every thread has stopped (no
    product still running as the call ends), and the next call is as before."""
    model, batches = cnn()
    monkeypatch.setattr(blocks_module, "cpu_threads", lambda: 2)
    monkeypatch.setattr(blocks_module, "MIN_THREADED_STEP", 0.0)
    good = block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace=False)
    original_advance, original_product = blocks_module._Chain.advance, blocks_module._Restricted._restricted
    running = [0]

    def advance(self, hq):  # the first block's third step fails; the other thread's blocks would go on
        if threading.current_thread() is not threading.main_thread() and self.m >= 2 and self.block.name == "0":
            raise RuntimeError("a step failed (simulated)")
        return original_advance(self, hq)

    def product(self, item):
        running[0] += 1
        try:
            time.sleep(0.03)
            return original_product(self, item)
        finally:
            running[0] -= 1

    monkeypatch.setattr(blocks_module._Chain, "advance", advance)
    monkeypatch.setattr(blocks_module._Restricted, "_restricted", product)
    with pytest.raises(RuntimeError, match="a step failed"):
        block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace=False)
    assert running[0] == 0
    monkeypatch.setattr(blocks_module._Chain, "advance", original_advance)
    again = block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace=False)
    assert again.eigenvalues == pytest.approx(good.eigenvalues, rel=1e-10)


def test_a_non_finite_product_names_the_block():
    """A NaN in a block's products used to surface as linalg.eigh's failure to converge; now a MeasurementError that
    names the block (the callbacks skip such a measurement with one warning)."""
    a = torch.eye(4, dtype=torch.float64)
    a[2, 3] = a[3, 2] = float("nan")
    with pytest.raises(blocks_module.MeasurementError, match="block 'late': a non-finite Hessian-vector product"):
        block_estimates(DenseOperator(a), {"early": [0, 1], "late": [2, 3]}, trace=False)


def test_restricted_products_failing_on_the_threads_fall_back_with_one_warning(monkeypatch):
    model, batches = cnn()
    h = exact_hessian(model, batches)
    monkeypatch.setattr(blocks_module, "cpu_threads", lambda: 2)
    original_part = LossOperator._restricted_part
    _record_products(monkeypatch, lambda block, on_main: time.sleep(0.02))  # threads measured faster (see above)

    def main_thread_only(self, *args):  # e.g. an op whose backward works only on the main thread
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("backward off the main thread (simulated)")
        return original_part(self, *args)

    monkeypatch.setattr(LossOperator, "_restricted_part", main_thread_only)
    with pytest.warns(RuntimeWarning, match="restricted Hessian-vector product failed") as caught:
        r = block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace=False, products="per_block")
    assert len([w for w in caught if "restricted Hessian-vector" in str(w.message)]) == 1
    assert r.threads == 1  # the products went to one operator per block, on this thread
    for name, names in r.blocks.items():
        idx = columns(model, names)
        assert r.eigenvalues[name] == pytest.approx(float(torch.linalg.eigvalsh(h[idx][:, idx])[-1]), rel=EIG_RTOL)


def test_a_quick_step_never_tries_the_threads(monkeypatch):
    model, batches = cnn()
    monkeypatch.setattr(blocks_module, "cpu_threads", lambda: 2)
    monkeypatch.setattr(blocks_module, "MIN_THREADED_STEP", 3600.0)  # every step is "quick"
    original, on_main = blocks_module._Restricted._restricted, []

    def spy(self, item):
        on_main.append(threading.current_thread() is threading.main_thread())
        return original(self, item)

    monkeypatch.setattr(blocks_module._Restricted, "_restricted", spy)
    r = block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace=False, products="per_block")
    assert r.threads == 1 and len(on_main) == sum(r.num_hvps.values()) and all(on_main)


def test_restricted_hvp_from_several_threads_builds_a_missing_graph_once(monkeypatch):
    model, batches = cnn()
    h = exact_hessian(model, batches)
    builds, original = [], LossOperator._build_gradient_graph

    def slow_build(self, *args):
        builds.append(threading.current_thread().name)
        time.sleep(0.05)  # long enough for every thread to arrive while the first builds
        return original(self, *args)

    with LossOperator(model, loss_fn, batches) as op:
        op.hvp(torch.ones(1, op.size, dtype=torch.float64))
        op._graphs.clear()  # as after the probe batches were split: the graphs are built again on demand
        monkeypatch.setattr(LossOperator, "_build_gradient_graph", slow_build)
        params = [[j] for j in range(len(op.spec.names))]
        barrier = threading.Barrier(4)

        def product(j: int) -> torch.Tensor:
            barrier.wait()
            v = torch.ones(1, op.spec.sizes[j], dtype=torch.float64)
            return op.restricted_hvp(v, [j])

        with ThreadPoolExecutor(4) as pool:
            out = list(pool.map(product, range(4)))
    assert len(builds) == 1  # the others waited for it and used it
    for j, hv in enumerate(out):
        idx = columns(model, [op.spec.names[j]])
        assert torch.allclose(hv[0], h[idx][:, idx].sum(dim=1), rtol=1e-10, atol=1e-12), params[j]


class _WithUnusedLayer(nn.Module):
    """An MLP with a layer its forward never calls (an auxiliary head, say): its Hessian block is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("products", ["per_block", "shared"])
def test_a_layer_the_loss_does_not_read_has_zero_curvature_and_spoils_no_other_block(products):
    """Several rows through one batched product used to give an unreached parameter an unbatched zero (and a
    restricted product then fell back, block by block, to operators that failed on the unread layer)."""
    torch.manual_seed(3)
    model = _WithUnusedLayer().double()
    batches = [(torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,)))]
    h = exact_hessian(model, batches)
    r = block_curvature(model, loss_fn, batches, "module", tol=1e-8, trace_samples=40, products=products)
    assert r.eigenvalues["aux"] == 0.0 and r.traces["aux"] == 0.0 and r.converged["aux"]
    for name in ("a", "b"):
        idx = columns(model, r.blocks[name])
        block = h[idx][:, idx]
        assert r.eigenvalues[name] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=EIG_RTOL)
        assert r.traces[name] == pytest.approx(float(block.trace()), rel=1e-9)  # exact: 33 and 21 unit vectors
    with LossOperator(model, loss_fn, batches) as op:  # the whole model: several rows in one batched backward
        v = torch.randn(3, op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(op.hvp(v), v @ h, rtol=1e-10, atol=1e-12)
        assert op._blocks_batched is True  # (it used to fail there and loop from then on)


@pytest.mark.parametrize("method", ["auto", "double_backward", "finite_difference", "forward_over_reverse"])
def test_an_operator_over_parameters_the_loss_does_not_read_is_zero(method):
    model = _WithUnusedLayer().double()
    batches = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    with LossOperator(model, loss_fn, batches, params="aux.*", hvp_method=method) as op:
        assert torch.equal(op.hvp(torch.ones(2, op.size, dtype=torch.float64)), torch.zeros(2, op.size))
        loss, grad = op.gradient()
        assert torch.equal(grad, torch.zeros(op.size)) and loss > 0


def test_attention_under_the_math_backend_shares_the_graph_too(monkeypatch):
    model, batches = transformer()  # the fused CPU attention kernel has no double backward: auto picks math SDPA
    h = exact_hessian(model, batches)
    opened = []
    original = LossOperator.__init__
    monkeypatch.setattr(LossOperator, "__init__", lambda self, *a, **k: (opened.append(1), original(self, *a, **k))[1])
    r = block_curvature(model, loss_fn, batches, "layer", tol=1e-8, trace=False, products="per_block")
    assert r.hvp_method == "double_backward+math_sdpa" and len(opened) == 1
    for name, names in r.blocks.items():
        idx = columns(model, names)
        assert r.eigenvalues[name] == pytest.approx(float(torch.linalg.eigvalsh(h[idx][:, idx])[-1]), rel=EIG_RTOL)


@pytest.mark.parametrize("products", ["per_block", "shared"])
def test_blocks_from_an_open_operator_and_a_whole_eigenvector(products):
    model, batches = cnn()
    h = exact_hessian(model, batches)
    with LossOperator(model, loss_fn, batches) as op:
        top = top_eigenvalues(op, 2, tol=1e-8)  # a whole-model measurement first, as HessianCallback does
        r = block_curvature(
            model,
            loss_fn,
            batches,
            "layer",
            trace=False,
            tol=1e-8,
            operator=op,
            init=top.eigenvectors,
            products=products,
        )
        assert r.total_hvps == sum(r.num_hvps.values())  # no start product, no second choice or check of the method
        after = op.hvp(top.eigenvectors[:1])  # still open, still the same operator
        assert torch.allclose(after[0], top.eigenvalues[0] * top.eigenvectors[0], rtol=1e-6, atol=1e-8)
        with pytest.raises(ValueError, match=r"`init` must have shape \[\d+\] or \[m, \d+\]"):
            block_curvature(model, loss_fn, batches, "layer", operator=op, init=torch.ones(3))
    for name, names in r.blocks.items():
        idx = columns(model, names)
        assert r.eigenvalues[name] == pytest.approx(float(torch.linalg.eigvalsh(h[idx][:, idx])[-1]), rel=EIG_RTOL)
    with LossOperator(model, loss_fn, batches, params=["0.weight"]) as op:
        with pytest.raises(ValueError, match=r"`operator` does not hold the blocks' parameters \['0.bias'"):
            block_curvature(model, loss_fn, batches, "layer", operator=op)
    with pytest.raises(ValueError, match="`operator` must be an open LossOperator"):
        block_curvature(model, loss_fn, batches, "layer", operator=DenseOperator(h))
    closed = LossOperator(model, loss_fn, batches)
    with pytest.raises(ValueError, match="`operator` must be open"):
        block_curvature(model, loss_fn, batches, "layer", operator=closed)
    other, _ = cnn()
    with LossOperator(other, loss_fn, batches) as op, pytest.raises(ValueError, match="built on another model"):
        block_curvature(model, loss_fn, batches, "layer", operator=op)
    with pytest.raises(ValueError, match=r"\(the blocks' parameters, in the model's order\)"):
        block_curvature(model, loss_fn, batches, "layer", init=torch.ones(3))


def test_an_operator_outside_its_with_block_refuses_to_evaluate():
    model, batches = cnn()
    model.train()  # BatchNorm in train mode: evaluated outside the block, it would update its running statistics
    before = model[1].running_mean.clone()
    op = LossOperator(model, loss_fn, batches)
    for call in (lambda: op.loss(), lambda: op.gradient(), lambda: op.hvp(torch.ones(1, op.size, dtype=torch.float64))):
        with pytest.raises(RuntimeError, match="outside its `with` block"):
            call()
    assert torch.equal(model[1].running_mean, before) and model.training
    with op:
        op.hvp(torch.ones(1, op.size, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"`params` must be distinct indices into the operator's 8 parameters"):
            op.restricted_hvp(torch.ones(1, 3), [0, 9])
    with pytest.raises(RuntimeError, match="outside its `with` block"):  # and after it
        op.loss()


def test_blocks_start_from_their_part_of_a_whole_product(monkeypatch):
    # block "first": H z leans to its top eigenvector, so its run takes fewer products than from a Gaussian start;
    # block "last": its top eigenvector (eigenvalue 0) is exactly orthogonal to H z, found from the start's noise
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    values = torch.cat([torch.tensor([50.0, 20.0]), torch.linspace(1.0, 0.0, 198)]).double()
    a = q @ torch.diag(values) @ q.T
    a[150:, :] = 0.0
    a[:, 150:] = 0.0
    a[150:, 150:] = torch.diag(torch.linspace(-1.0, 0.0, 50)).double()  # block "last": top eigenvalue 0, H z · e = 0
    blocks = {"first": range(0, 150), "last": range(150, 200)}
    r = block_estimates(DenseOperator(a), blocks, trace=False, tol=1e-8, generator=torch.Generator().manual_seed(1))
    exact = {n: float(torch.linalg.eigvalsh(a[list(c)][:, list(c)])[-1]) for n, c in blocks.items()}
    assert r.eigenvalues["first"] == pytest.approx(exact["first"], rel=1e-6)
    assert r.eigenvalues["last"] == pytest.approx(exact["last"], abs=1e-6)
    assert r.total_hvps == sum(r.num_hvps.values()) + 1  # the start's whole product

    def gaussian_starts(products, parts, generator, init=None):
        return [torch.randn(b.size, generator=generator, dtype=torch.float64) for b in parts]

    monkeypatch.setattr(blocks_module, "_starts", gaussian_starts)
    cold = block_estimates(DenseOperator(a), blocks, trace=False, tol=1e-8, generator=torch.Generator().manual_seed(1))
    assert cold.eigenvalues["first"] == pytest.approx(exact["first"], rel=1e-6)
    assert r.num_hvps["first"] < cold.num_hvps["first"]


def test_gradient_overlap_matches_numpy_projection():
    model, batches = mlp()
    h = exact_hessian(model, batches).numpy()
    _, vectors = np.linalg.eigh(h)
    top = vectors[:, ::-1][:, :5].T.copy()  # five top eigenvectors as rows
    params = list(model.parameters())
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(model, batches[0]), params)]).numpy()
    expected = [np.linalg.norm(top[:k].T @ (top[:k] @ grad)) ** 2 / np.linalg.norm(grad) ** 2 for k in range(1, 6)]
    got = hessian_gradient_overlap(model, loss_fn, batches, torch.from_numpy(top))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)  # float64 rounding only
    assert bool((got.diff() >= 0).all()) and float(got[-1]) <= 1.0
    with pytest.raises(ValueError, match="orthonormal rows"):
        gradient_overlap(torch.from_numpy(top) * 2, torch.from_numpy(grad))
    with pytest.raises(ValueError, match=r"must be \[k, \d+\]"):
        hessian_gradient_overlap(model, loss_fn, batches, torch.from_numpy(top[:, :10]))


def test_split_blocks_module_layer_parameter_and_frozen():
    model, _ = transformer()
    model[2].bias.requires_grad_(False)
    assert list(split_blocks(model)) == ["0", "2"]
    assert list(split_blocks(model, "layer")) == [
        "0.self_attn", "0.self_attn.out_proj", "0.linear1", "0.linear2", "0.norm1", "0.norm2", "2",
    ]  # fmt: skip
    assert split_blocks(model, "layer")["2"] == ["2.weight"]  # the frozen bias is skipped
    assert len(split_blocks(model, "parameter")) == len([p for p in model.parameters() if p.requires_grad])
    root = nn.Module()
    root.scale = nn.Parameter(torch.ones(2))  # a parameter of the model itself: its own block
    root.head = nn.Linear(2, 1)
    assert split_blocks(root) == {"scale": ["scale"], "head": ["head.weight", "head.bias"]}


def test_bad_blocks_are_errors_naming_the_argument():
    model, batches = mlp()
    with pytest.raises(ValueError, match=r"`by` must be one of \('module', 'layer', 'parameter'\)"):
        split_blocks(model, "layers")
    with pytest.raises(ValueError, match=r"blocks 'a' and 'b' overlap \(both hold '0.weight'\)"):
        split_blocks(model, {"a": "0.*", "b": ["0.weight"]})
    with pytest.raises(ValueError, match=r"`by`\['b'\]: `params`: '9\.\*' is neither"):
        split_blocks(model, {"a": "0.*", "b": "9.*"})  # an empty block
    with pytest.raises(ValueError, match="`trace_samples` must be >= 3"):
        block_curvature(model, loss_fn, batches, trace_samples=2)
    with pytest.raises(ValueError, match="`tol` must be > 0"):
        block_curvature(model, loss_fn, batches, tol=0.0)
    with pytest.raises(ValueError, match=r"`products` must be one of \('auto', 'shared', 'per_block'\)"):
        block_curvature(model, loss_fn, batches, products="batched")
    with pytest.raises(ValueError, match="nothing to compute"):
        block_curvature(model, loss_fn, batches, eigenvalues=False, trace=False)

    class Sharded(DenseOperator):
        space = type("Space", (), {"distributed": True})()

    with pytest.raises(NotImplementedError, match="sharded"):
        block_estimates(Sharded(torch.eye(2)), {"a": [0]})
