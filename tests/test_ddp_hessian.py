"""HessianCallback under real DDP: two CPU processes (gloo) in a subprocess."""

from __future__ import annotations

import glob

import pytest
from _ddp import run_ddp

BODY = """
import torch, pytorch_lightning as pl
from _lightning import DigitsModule, loaders
from _models import cross_entropy
from lightning_landscape import HessianCallback
from lightning_landscape import functional as LF

train, _ = loaders(n_train=256, batch_size=32, shuffle=True)
cb = HessianCallback(every_n_train_steps=2, top_k=2, trace=True, trace_hvps=12, loss_fn=cross_entropy,
                     num_batches=1, blocks="module", block_trace_hvps=4)
module = DigitsModule(lr=0.1)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, default_root_dir=OUT, callbacks=[cb],
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.fit(module, train)
# pool both ranks' probe batches and measure them in this one process, at the same (final) weights
(x, y), = cb._probe
xs, ys = trainer.strategy.all_gather(x), trainer.strategy.all_gather(y)
pooled = [(xs[0], ys[0]), (xs[1], ys[1])]
single = LF.hessian_eigenvalues(module, cross_entropy, pooled, k=1, tol=1e-7).eigenvalues[0].item()
own = LF.hessian_eigenvalues(module, cross_entropy, cb._probe, k=1, tol=1e-7).eigenvalues[0].item()
blocks = LF.block_curvature(module, cross_entropy, pooled, cb._block_params, trace=False, tol=1e-7).eigenvalues
report({"metrics": cb.last_metrics, "single": single, "own": own, "probe": x.sum().item(), "blocks": blocks,
        "weights": [p.detach().sum().item() for p in module.parameters()]})
"""


@pytest.mark.slow
def test_ddp_ranks_agree_and_average_probe_data(tmp_path):
    r0, r1 = run_ddp(tmp_path, BODY)
    top = r0["metrics"]["hessian/eigenvalue_1"]
    assert top == r1["metrics"]["hessian/eigenvalue_1"]
    assert r0["metrics"]["hessian/trace"] == r1["metrics"]["hessian/trace"]
    assert r0["weights"] == r1["weights"]
    # each rank probes its own shard; the logged eigenvalue is that of the pooled probe set
    assert r0["probe"] != r1["probe"]
    assert abs(top - r0["single"]) / r0["single"] < 2e-3
    assert abs(top - r0["own"]) / r0["own"] > 5e-3 or abs(top - r1["own"]) / r1["own"] > 5e-3
    # per-block eigenvalues: the pooled probe's too (products reduced over the ranks, one operator per block here)
    assert len(r0["blocks"]) >= 2
    for name, value in r0["blocks"].items():
        logged = r0["metrics"][f"hessian/{name}/eigenvalue_1"]
        assert logged == r1["metrics"][f"hessian/{name}/eigenvalue_1"]
        assert abs(logged - value) / abs(value) < 2e-3, name
    # only rank zero writes event files
    assert len(glob.glob(f"{tmp_path}/**/events.out.tfevents.*", recursive=True)) == 1
