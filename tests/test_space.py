"""The vector spaces the algorithms reduce through: whole vectors (``EUCLIDEAN``) and FSDP2-style shards.

- ``EUCLIDEAN`` is exactly the plain torch the algorithms used before (the existing suites pin the numbers);
- ``ShardedSpace`` on one process agrees with ``EUCLIDEAN`` to rounding, and its random vectors are the same
  global vectors however the parameters are split;
- two real processes (gloo) run top-k, Hutch++, SLQ and the sharpness measures on a dense operator whose
  vectors are split into uneven shards (a replicated parameter, a parameter one rank holds nothing of): the
  results match the dense answers and a one-process run holding everything (same random vectors).

Run as a script (``python test_space.py OUT``) this module is the two-process job the last test launches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _quadratics import trust_region_max

from lightning_landscape.functional._random import gaussian, rademacher
from lightning_landscape.functional._space import EUCLIDEAN, ShardedSpace, ShardSlice, VectorSpace
from lightning_landscape.functional.eigen import top_eigenvalues
from lightning_landscape.functional.sharpness import sharpness_estimate
from lightning_landscape.functional.trace import slq_density, trace_estimate

F64 = torch.float64

# "parameters" of the test operator: shape and whether every process holds it whole; 15 + 7 + 8 + 10 = 40
LAYOUT = [((5, 3), False), ((7,), True), ((4, 2), False), ((10,), False)]
# the rows each of two ranks holds (uneven; rank 1 holds nothing of the (4, 2) parameter)
SPLITS = [[(0, 3), (0, 7), (0, 4), (0, 2)], [(3, 5), (0, 7), (4, 4), (2, 10)]]
N = 40


def slices(rank: int | None) -> list[ShardSlice]:
    """``rank``'s slices, or (``None``) one process holding everything."""
    out = []
    for i, (shape, replicated) in enumerate(LAYOUT):
        start, stop = (0, shape[0]) if rank is None else SPLITS[rank][i]
        out.append(ShardSlice(shape, start, stop, replicated=replicated))
    return out


def positions(parts: list[ShardSlice]) -> torch.Tensor:
    """Where each local entry sits in the global flat vector."""
    index, offset = [], 0
    for s in parts:
        index.append(offset + torch.arange(s.start * s.row_size, s.stop * s.row_size))
        offset += s.rows * s.row_size
    return torch.cat(index)


def matrix() -> torch.Tensor:
    """Symmetric 40×40, eigenvalues 9, 9 (repeated, on top), 7, …, and three negative ones."""
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(0), dtype=F64))
    lam = torch.linspace(0.2, 6.0, N, dtype=F64)
    lam[-3:] = torch.tensor([7.0, 9.0, 9.0], dtype=F64)
    lam[:3] = torch.tensor([-4.0, -1.5, -0.5], dtype=F64)
    return (q * lam) @ q.T


class ShardedDense:
    """The quadratic loss ``½xᵀAx + bᵀx`` at ``x = θ + δ`` on vectors held as shards (test only: products and
    losses all-gather the global vector). ``layouts`` are every rank's slices; one layout: one process."""

    method = "dense"

    def __init__(self, a: torch.Tensor, layouts: list[list[ShardSlice]], rank: int, group=None) -> None:
        self.a, self.rank, self.world = a, rank, len(layouts)
        self.space = ShardedSpace(layouts[rank], group=group, world_size=self.world)
        self.indices = [positions(p) for p in layouts]
        self.index = self.indices[rank]
        self.size, self.dtype, self.device = len(self.index), a.dtype, torch.device("cpu")
        g = torch.Generator().manual_seed(1)
        self.theta = torch.randn(N, generator=g, dtype=F64)
        self.b = torch.randn(N, generator=g, dtype=F64)

    def globalize(self, local: torch.Tensor) -> torch.Tensor:
        """``[k, size]`` local rows -> ``[k, N]`` global vectors (every process)."""
        out = torch.zeros(local.shape[0], N, dtype=local.dtype)
        if self.world == 1:
            out[:, self.index] = local
            return out
        width = max(len(i) for i in self.indices)
        padded = torch.zeros(local.shape[0], width, dtype=local.dtype)
        padded[:, : self.size] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, padded)
        for index, part in zip(self.indices, gathered, strict=True):
            out[:, index] = part[:, : len(index)]
        return out

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return (self.globalize(vectors) @ self.a)[:, self.index]

    def parameter_vector(self) -> torch.Tensor:
        return self.theta[self.index].clone()

    def _at(self, delta: torch.Tensor | None) -> torch.Tensor:
        return self.theta if delta is None else self.theta + self.globalize(delta.reshape(1, -1))[0]

    def loss(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        x = self._at(delta)
        return 0.5 * x @ self.a @ x + self.b @ x

    def gradient(self, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._at(delta)
        return 0.5 * x @ self.a @ x + self.b @ x, (self.a @ x + self.b)[self.index]


def measure(op: ShardedDense) -> dict[str, torch.Tensor]:
    """Everything the two-process test compares (every process returns the same global values)."""
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    out = {}
    top = top_eigenvalues(op, 3, max_hvps=N, tol=1e-10, generator=gen(1))
    out["eig"], out["eigvec"] = top.eigenvalues, op.globalize(top.eigenvectors)
    out["projector"] = out["eigvec"].T @ out["eigvec"]  # (the pair for 9, 9 is any basis of its eigenspace)
    warm = top_eigenvalues(op, 3, init=top.eigenvectors, max_hvps=N, tol=1e-10, generator=gen(2))
    out["warm"] = warm.eigenvalues
    out["hutch++"] = torch.tensor(trace_estimate(op, 3 * N, generator=gen(3)).estimate, dtype=F64)
    small = trace_estimate(op, 30, generator=gen(3))
    out["hutch++30"] = torch.tensor([small.estimate, small.stderr], dtype=F64)
    out["hutchinson"] = torch.tensor(trace_estimate(op, 20, method="hutchinson", generator=gen(4)).estimate, dtype=F64)
    d = slq_density(op, num_probes=3, num_steps=12, generator=gen(5))
    out["slq_nodes"], out["slq_weights"] = d.nodes, d.weights
    out["slq_restart"] = slq_density(op, num_probes=1, num_steps=N, generator=gen(6)).nodes  # breakdown, restart
    for name, kwargs in {
        "wc_l2_exact": {"steps": N + 5},
        "wc_l2": {"steps": 8},
        "wc_l2_adaptive": {"steps": 8, "adaptive": True},
        "wc_linf": {"norm": "linf", "steps": 6},
        "keskar": {"kind": "keskar", "steps": 6},
        "avg_l2": {"kind": "average_case", "samples": 4},
        "avg_linf": {"kind": "average_case", "norm": "linf", "samples": 4},
    }.items():
        out[name] = torch.tensor(sharpness_estimate(op, 0.3, generator=gen(7), **kwargs).value, dtype=F64)
    return out


# ---------------------------------------------------------------------------------------------- EUCLIDEAN
def test_euclidean_is_plain_torch():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 50, generator=g), torch.randn(4, 50, generator=g)
    assert EUCLIDEAN.distributed is False and isinstance(EUCLIDEAN, VectorSpace)
    assert torch.equal(EUCLIDEAN.inner(a, b), a @ b.T)
    assert torch.equal(EUCLIDEAN.inner(a, b[0]), a @ b[0])
    assert torch.equal(EUCLIDEAN.inner(a, a, dtype=F64), a.double() @ a.double().T)
    assert torch.equal(EUCLIDEAN.row_dots(a, b[:3]), (a * b[:3]).sum(1))
    assert torch.equal(EUCLIDEAN.norms(a), a.norm(dim=1))
    assert torch.equal(EUCLIDEAN.norm(a), torch.linalg.vector_norm(a))
    assert torch.equal(EUCLIDEAN.max_abs(a), a.abs().max()) and EUCLIDEAN.total(a) == a.sum()
    q, r = EUCLIDEAN.orthonormal_rows(a)
    q0, r0 = torch.linalg.qr(a.T)
    assert torch.equal(q, q0.T) and torch.equal(r, r0)
    for draw, plain in ((EUCLIDEAN.gaussian, gaussian), (EUCLIDEAN.rademacher, rademacher)):
        x = draw(3, 50, torch.Generator().manual_seed(5), torch.float32, "cpu")
        assert torch.equal(x, plain((3, 50), torch.Generator().manual_seed(5), torch.float32, torch.device("cpu")))


# ---------------------------------------------------------------------------------------------- one process
def test_sharded_space_one_process_matches_euclidean():
    space = ShardedSpace(slices(None))
    assert space.distributed and space.numel == N and space.dimension(N) == N
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, N, generator=g, dtype=F64), torch.randn(3, N, generator=g, dtype=F64)
    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)  # noqa: E731
    close(space.inner(a, b), EUCLIDEAN.inner(a, b))
    close(space.inner(a.float(), b.float(), dtype=F64), a.float().double() @ b.float().double().T)
    close(space.inner(a, b[0]), a @ b[0])
    close(space.row_dots(a[:3], b), EUCLIDEAN.row_dots(a[:3], b))
    close(space.norms(a), EUCLIDEAN.norms(a))
    close(space.norm(a), EUCLIDEAN.norm(a))
    close(space.total(a), a.sum())
    assert space.max_abs(a) == a.abs().max()
    q, r = space.orthonormal_rows(a)
    q0, r0 = EUCLIDEAN.orthonormal_rows(a)
    sign = torch.sign(r0.diagonal())  # Householder's signs; Cholesky QR's diagonal is positive
    close(q, q0 * sign[:, None])
    close(r, r0 * sign[:, None])
    assert (r.diagonal() > 0).all() and torch.equal(r, r.triu())


def test_orthonormal_rows_rank_deficient():
    space = ShardedSpace(slices(None))
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, N, generator=g, dtype=F64)
    v = torch.stack([base[0], base[1], base[0] - 2 * base[1], torch.zeros(N, dtype=F64), base[2]])
    q, r = space.orthonormal_rows(v)
    kept = r.diagonal() > 0
    assert kept.tolist() == [True, True, False, False, True]
    torch.testing.assert_close(q[kept] @ q[kept].T, torch.eye(3, dtype=F64), rtol=0, atol=1e-13)
    assert torch.equal(q[~kept], torch.zeros_like(q[~kept]))
    torch.testing.assert_close(r.T @ q, v, rtol=0, atol=1e-12)
    # float32 vectors, Gram matrices in float64: orthonormal to float32 rounding
    w = torch.randn(6, N, generator=g) * torch.logspace(0, -3, 6)[:, None]
    q, r = space.orthonormal_rows(w)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q @ q.T, torch.eye(6), rtol=0, atol=1e-6)
    torch.testing.assert_close(r.T @ q, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "uniform"])
def test_random_vectors_do_not_depend_on_the_split(kind):
    """Every rank's draw is its rows of the one-process draw (no collectives: draws only read the layout)."""
    whole = getattr(ShardedSpace(slices(None)), kind)(3, N, torch.Generator().manual_seed(4), F64, "cpu")
    for rank in range(2):
        space = ShardedSpace(slices(rank), world_size=2)
        part = getattr(space, kind)(3, space.numel, torch.Generator().manual_seed(4), F64, "cpu")
        assert torch.equal(part, whole[:, positions(slices(rank))])
    with pytest.raises(ValueError, match="entries"):
        ShardedSpace(slices(0), world_size=2).gaussian(1, N, torch.Generator(), F64, "cpu")


def test_shard_slices():
    assert ShardSlice((), 0, 1, replicated=True).numel == 1
    scalar = ShardedSpace([ShardSlice((), 0, 1, replicated=True), ShardSlice((3, 2), 1, 3)], world_size=1)
    assert scalar.numel == 5 and scalar.dimension(5) == 7
    assert scalar.gaussian(2, 5, torch.Generator().manual_seed(0), F64, "cpu").shape == (2, 5)
    with pytest.raises(ValueError, match="start <= stop"):
        ShardedSpace([ShardSlice((3,), 2, 4)])
    with pytest.raises(ValueError, match="replicated"):
        ShardedSpace([ShardSlice((3,), 0, 2, replicated=True)])


def test_algorithms_on_one_process_sharded_space():
    """The algorithms run through a ShardedSpace holding everything and find the dense answers."""
    op = ShardedDense(matrix(), [slices(None)], 0)
    out = measure(op)
    _check_dense(out, op)


def _check_dense(out: dict[str, torch.Tensor], op: ShardedDense) -> None:
    a = op.a
    exact = torch.linalg.eigvalsh(a).flip(0)[:3]
    torch.testing.assert_close(out["eig"], exact, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out["warm"], exact, rtol=1e-8, atol=1e-8)
    vec = out["eigvec"]
    torch.testing.assert_close(vec @ a, out["eig"][:, None] * vec, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["hutch++"], a.trace(), rtol=1e-8, atol=1e-8)
    # one chain of 40 steps: breaks down after the 39 distinct eigenvalues, restarts into the repeated one's space
    nodes = out["slq_restart"][0].sort().values
    torch.testing.assert_close(nodes, torch.linalg.eigvalsh(a), rtol=0, atol=1e-8)
    # Gauss quadrature from 12 steps is exact for moments up to degree 23: vᵀAᵏv / vᵀv of each probe
    probes = ShardedSpace(slices(None)).gaussian(3, N, torch.Generator().manual_seed(5), F64, "cpu")
    for k in range(6):
        moments = (probes @ torch.linalg.matrix_power(a, k) * probes).sum(1) / (probes * probes).sum(1)
        quadrature = (out["slq_weights"] * out["slq_nodes"] ** k).sum(1)
        torch.testing.assert_close(quadrature, moments, rtol=1e-9, atol=1e-9)
    g = a @ op.theta + op.b
    torch.testing.assert_close(
        out["wc_l2_exact"], torch.tensor(trust_region_max(a, g, 0.3), dtype=F64), rtol=1e-8, atol=0
    )


# ---------------------------------------------------------------------------------------------- two processes
def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rdv", rank=rank, world_size=2)
    try:
        op = ShardedDense(matrix(), [slices(0), slices(1)], rank)
        space = op.space
        g = torch.Generator().manual_seed(8)
        whole = ShardedSpace(slices(None)).gaussian(4, N, g, F64, "cpu")
        local = whole[:, op.index]
        results = measure(op)
        results.update(
            inner=space.inner(local, local),
            inner64=space.inner(local.float(), local.float(), dtype=F64),
            row_dots=space.row_dots(local, local.flip(0)),
            norms=space.norms(local),
            norm=space.norm(local),
            total=space.total(local),
            max_abs=space.max_abs(local),
            dimension=torch.tensor(space.dimension(op.size)),
        )
        q, r = space.orthonormal_rows(local)
        results["q"], results["r"] = op.globalize(q), r
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, timeout=120, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # the same global values on both ranks
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=1e-12, atol=1e-12, msg=key)
    res = ranks[0]
    # the reductions against plain torch on the global vectors (the replicated parameter counted once)
    whole = ShardedSpace(slices(None)).gaussian(4, N, torch.Generator().manual_seed(8), F64, "cpu")
    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)  # noqa: E731
    close(res["inner"], whole @ whole.T)
    close(res["inner64"], whole.float().double() @ whole.float().double().T)
    close(res["row_dots"], (whole * whole.flip(0)).sum(1))
    close(res["norms"], whole.norm(dim=1))
    close(res["norm"], whole.norm())
    close(res["total"], whole.sum())
    assert res["max_abs"] == whole.abs().max() and int(res["dimension"]) == N
    q, r = EUCLIDEAN.orthonormal_rows(whole)
    sign = torch.sign(r.diagonal())
    close(res["q"], q * sign[:, None])
    close(res["r"], r * sign[:, None])
    # the algorithms: dense answers, and a one-process run holding everything (the same random vectors)
    one = ShardedDense(matrix(), [slices(None)], 0)
    _check_dense(res, one)
    reference = measure(one)
    for key, value in reference.items():
        if key == "eigvec":  # the repeated eigenvalue's pair depends on rounding: compare the projector
            continue
        torch.testing.assert_close(res[key], value, rtol=1e-10, atol=1e-10, equal_nan=True, msg=key)


if __name__ == "__main__":
    torch.multiprocessing.spawn(_worker, args=(sys.argv[1],), nprocs=2, join=True)
