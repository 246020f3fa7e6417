"""TrajectoryCallback and trajectory_pca on FSDP2-sharded models (issue 16): each rank keeps its own shards.

One subprocess runs everything: the reference fit (the same float64 MLP unsharded in one process, batches of 16),
then two ``ModelParallelStrategy(data_parallel_size=2)`` fits on 2 gloo processes (rank r takes samples r, r+2,
..., so batch k of both ranks together is batch k of the reference), one without and one with the callback, and
a functional check of ``trajectory_pca`` over a ``ShardedSpace`` (rows split unevenly, a replicated parameter).
Every rank writes what it saw to a JSON file the tests compare.

Tolerances: the sharded fit equals the reference up to FSDP2's order of summation (~1e-15 relative per step, below
1e-10 after the fit: tests/test_sharded.py); the PCA and the grid are float64 functions of those weights whose
condition here is mild (the two explained variances are well apart from the third), so 1e-6 relative is loose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lightning_landscape.functional._space import ShardedSpace, ShardSlice
from lightning_landscape.functional.trajectory import SnapshotStore, trajectory_pca

_SCRIPT = r"""
import json, os, sys
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
import pytorch_lightning as pl
from pytorch_lightning.strategies import ModelParallelStrategy
from lightning_landscape.callbacks.trajectory import TrajectoryCallback

OUT = sys.argv[1]
RANK = int(os.environ.get("LOCAL_RANK", 0))
torch.set_num_threads(1)

class Net(pl.LightningModule):
    def __init__(self, sharded):
        super().__init__()
        self.sharded = sharded
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    def configure_model(self):
        if self.sharded:
            from torch.distributed.fsdp import fully_shard
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2], self.net[4]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)

g = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(96, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (96,), generator=g))
loss_fn = lambda m, b: F.cross_entropy(m.net(b[0]), b[1])

def weights(module):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1).tolist()
            for n, p in module.named_parameters()}

def fit(sharded, callbacks, max_steps=6, resume=None):
    module = Net(sharded)
    common = dict(accelerator="cpu", max_steps=max_steps, logger=False, callbacks=callbacks,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=OUT)
    if sharded:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        sampler = DistributedSampler(data, num_replicas=2, rank=RANK, shuffle=False)  # Lightning's would shuffle
        trainer = pl.Trainer(devices=2, strategy=strategy, use_distributed_sampler=False, **common)
        trainer.fit(module, DataLoader(data, batch_size=8, sampler=sampler), ckpt_path=resume)
    else:
        trainer = pl.Trainer(devices=1, **common)
        trainer.fit(module, DataLoader(data, batch_size=16), ckpt_path=resume)
    if resume is None:  # a checkpoint at step 6 for the resumed fits
        trainer.save_checkpoint(os.path.join(OUT, f"{'sharded' if sharded else 'ref'}.ckpt"))
    return module

def callback(tag):
    return TrajectoryCallback(every_n_train_steps=3, snapshot_every_n_train_steps=1, max_snapshots=4, steps=5,
                              margin=0.2, loss_fn=loss_fn, num_batches=1, directory=os.path.join(OUT, tag))

def plane(cb):
    s = cb.last_surface
    return {"ev": s.plane.explained_variance.tolist(), "coords": s.plane.coords.tolist(), "steps": s.plane.steps,
            "x": s.x.tolist(), "y": s.y.tolist(), "losses": s.losses.tolist(),
            "directions": s.plane.directions.tolist(), "store": cb.store.steps, "measured": cb._measured_in_fit,
            "metrics": {k: v for k, v in cb.last_metrics.items() if not k.endswith("seconds")}}

if RANK == 0 and "LOCAL_RANK" not in os.environ:  # the parent process, before the sharded fits launch rank 1
    cb = callback("ref")
    module = fit(False, [cb])
    resumed = callback("ref")
    fit(False, [resumed], max_steps=10, resume=os.path.join(OUT, "ref.ckpt"))
    with open(os.path.join(OUT, "ref.json"), "w") as f:
        json.dump({"plane": plane(cb), "weights": weights(module), "resumed": plane(resumed)}, f)

out = {"plain": weights(fit(True, []))}
cb = callback("sharded")
module = fit(True, [cb])
out["watched"] = weights(module)
out["plane"] = plane(cb)
from lightning_landscape.functional._sharded import sharded_parameters
from lightning_landscape.functional.surface import _sharded_layout
_, _, slices, _, _ = sharded_parameters(module)
out["slices"] = [[list(s.global_shape), s.start, s.stop] for s in slices]
local = torch.cat([t.reshape(-1) for t in _sharded_layout(module, None)[1]])
out["files"] = sorted(os.listdir(os.path.join(OUT, "sharded", f"rank{RANK}")))
out["last_is_final"] = torch.equal(torch.load(cb.store.paths[-1]), local)
out["local_numel"] = local.numel()
resumed = callback("sharded")  # rank zero's callback state in the checkpoint: each rank maps it to its own files
fit(True, [resumed], max_steps=10, resume=os.path.join(OUT, "sharded.ckpt"))
out["resumed"] = plane(resumed)
out["resumed_paths"] = [os.path.relpath(p, OUT) for p in resumed.store.paths]

# functional: trajectory_pca over a ShardedSpace, against the whole vectors in one process
import torch.distributed as dist
from lightning_landscape.functional._space import ShardedSpace, ShardSlice
from lightning_landscape.functional.trajectory import SnapshotStore, trajectory_pca
gen = torch.Generator().manual_seed(3)
path = [torch.randn(13, generator=gen, dtype=torch.float64) * (1 + i) for i in range(7)]  # a [5, 2] and a [3]
rows = (0, 3) if RANK == 0 else (3, 5)
space = ShardedSpace([ShardSlice((5, 2), *rows), ShardSlice((3,), 0, 3, replicated=True)], world_size=2)
def mine(v):
    return torch.cat([v[:10].reshape(5, 2)[rows[0]:rows[1]].reshape(-1), v[10:]])
store = SnapshotStore(os.path.join(OUT, "functional", f"rank{RANK}"))
calls = []
reduce = dist.all_reduce
def counting(*args, **kwargs):
    calls.append(1)
    return reduce(*args, **kwargs)
dist.all_reduce = counting
counts = []
for i, v in enumerate(path):
    store.add(mine(v), step=i)
    if i in (3, 6):  # the Gram matrix of 4 snapshots, then extended by 3 (two chunks of 2)
        before = len(calls)
        p = trajectory_pca(store, mine(path[-1] * 0.9), chunk=2, space=space)
        counts.append(len(calls) - before)
dist.all_reduce = reduce
out["functional"] = {"ev": p.explained_variance.tolist(), "coords": p.coords.tolist(),
                     "directions": p.directions.tolist(), "rows": list(rows), "all_reduces": counts,
                     "gram": store.gram.tolist()}
with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
    json.dump(out, f)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("trajectory_sharded")
    script = tmp / "fit.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp)], cwd=tmp, env=env, timeout=300, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ref = json.loads((tmp / "ref.json").read_text())
    return ref, [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def _assemble(ranks: list[dict], key: str) -> np.ndarray:
    """The full directions ``[2, numel]`` (ParamSpec layout) from every rank's local rows of each parameter."""
    parts, offsets = [], [0, 0]
    for k, (shape, _, _) in enumerate(ranks[0]["slices"]):
        row = int(np.prod(shape[1:]))
        pieces = []
        for r, rank in enumerate(ranks):
            _, start, stop = rank["slices"][k]
            size = (stop - start) * row
            pieces.append(np.asarray(rank["plane"][key])[:, offsets[r] : offsets[r] + size])
            offsets[r] += size
        parts.append(np.concatenate(pieces, axis=1))
    return np.concatenate(parts, axis=1)


@pytest.mark.slow
def test_sharded_trajectory_equals_unsharded(runs):
    ref, ranks = runs
    for rank in ranks:
        assert rank["watched"] == rank["plain"]  # bitwise: the callback left training as it was
        plane = rank["plane"]
        # steps 0..4 thinned to 0, 2, 4 (more than 4 kept), then 6: the same on every rank as in one process
        assert plane["store"] == ref["plane"]["store"] == [0, 2, 4, 6]
        assert plane["steps"] == [0, 2, 4, 6] and plane["measured"] == ref["plane"]["measured"] == 2
        assert len(rank["files"]) == 4 and rank["last_is_final"]  # its own shards, the final weights last
        np.testing.assert_allclose(plane["ev"], ref["plane"]["ev"], rtol=1e-6)
        coords, ref_coords = np.asarray(plane["coords"]), np.asarray(ref["plane"]["coords"])
        np.testing.assert_allclose(coords, ref_coords, rtol=0, atol=1e-6 * np.abs(ref_coords).max())
        np.testing.assert_allclose(plane["x"], ref["plane"]["x"], rtol=1e-6)
        np.testing.assert_allclose(plane["y"], ref["plane"]["y"], rtol=1e-6)
        np.testing.assert_allclose(plane["losses"], ref["plane"]["losses"], rtol=1e-6)
        for key, value in ref["plane"]["metrics"].items():
            assert plane["metrics"][key] == pytest.approx(value, rel=1e-6), key
    # every rank took the same eigen-decomposition of the same summed Gram matrix: identical numbers
    for key in ("ev", "coords", "x", "y", "losses", "metrics"):
        assert ranks[0]["plane"][key] == ranks[1]["plane"][key], key
    # resumed from a checkpoint at step 6 (which holds rank zero's state) to step 10: every rank goes on with
    # its own files; steps 0..8 thinned to 0, 4, 8, then the final 10
    for r, rank in enumerate(ranks):
        resumed, ref_resumed = rank["resumed"], ref["resumed"]
        assert resumed["store"] == ref_resumed["store"] == [0, 4, 8, 10]
        assert all(p.startswith(os.path.join("sharded", f"rank{r}")) for p in rank["resumed_paths"])
        np.testing.assert_allclose(resumed["ev"], ref_resumed["ev"], rtol=1e-6)
        np.testing.assert_allclose(resumed["losses"], ref_resumed["losses"], rtol=1e-6)
    # each rank holds its rows of the directions (4 + 3, 3 + 2, 2 + 1 rows): together the unsharded ones
    assert [r["local_numel"] for r in ranks] == [4 * 4 + 4 + 3 * 7 + 3 + 2 * 5 + 2, 3 * 4 + 3 + 2 * 7 + 2 + 5 + 1]
    np.testing.assert_allclose(_assemble(ranks, "directions"), np.asarray(ref["plane"]["directions"]), atol=1e-6)


@pytest.mark.slow
def test_sharded_pca_sums_the_gram_matrix_in_one_all_reduce(runs):
    _, ranks = runs
    gen = torch.Generator().manual_seed(3)
    path = [torch.randn(13, generator=gen, dtype=torch.float64) * (1 + i) for i in range(7)]  # as in the script
    whole = trajectory_pca(path, path[-1] * 0.9)
    f0, f1 = ranks[0]["functional"], ranks[1]["functional"]
    # one all-reduce for the new Gram entries, one for <θ_i − θ_0, c − θ_0> and ‖c − θ_0‖², whatever the chunks
    assert f0["all_reduces"] == f1["all_reduces"] == [2, 2]
    assert f0["gram"] == f1["gram"] and f0["coords"] == f1["coords"] and f0["ev"] == f1["ev"]
    # float64 sums of 13 products in another grouping: ~1e-16 relative; 1e-10 is ample
    np.testing.assert_allclose(f0["ev"], whole.explained_variance.numpy(), rtol=1e-10)
    np.testing.assert_allclose(f0["coords"], whole.coords.numpy(), rtol=1e-10, atol=1e-12)
    for f in (f0, f1):  # its rows of the [5, 2] parameter, then the replicated [3] one whole
        lo, hi = f["rows"]
        d = whole.directions.numpy()
        expected = np.concatenate([d[:, :10].reshape(2, 5, 2)[:, lo:hi].reshape(2, -1), d[:, 10:]], axis=1)
        np.testing.assert_allclose(f["directions"], expected, rtol=1e-10, atol=1e-12)


def test_pca_through_a_one_process_sharded_space_equals_whole_vectors(tmp_path):
    """The space's path in one process (no collective): the local products as they are, the same plane."""
    gen = torch.Generator().manual_seed(4)
    path = [torch.randn(9, generator=gen, dtype=torch.float64) * (1 + i) for i in range(5)]
    space = ShardedSpace([ShardSlice((3, 2), 0, 3), ShardSlice((3,), 0, 3, replicated=True)])
    store = SnapshotStore(tmp_path)
    for i, v in enumerate(path):
        store.add(v, step=i)
    plane = trajectory_pca(store, path[2], space=space, chunk=2)
    whole = trajectory_pca(path, path[2])
    # the same products in the same order (one run of entries): equal to rounding
    torch.testing.assert_close(plane.coords, whole.coords, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plane.directions, whole.directions, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="`space`"):
        trajectory_pca(path, path[2], space=ShardedSpace([ShardSlice((4, 2), 0, 4)]))
    with pytest.raises(TypeError, match="`space`"):
        trajectory_pca(path, path[2], space="sharded")
