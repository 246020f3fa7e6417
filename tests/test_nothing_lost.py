"""The whole plugin at once: training is bitwise the same with every callback on; DDP with SAM."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from _ddp import run_ddp
from _lightning import loaders, read_events, scalar_steps
from torch import nn

from lightning_landscape import HessianCallback, LossLandscapeCallback, SharpnessCallback


class BNDropoutModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _all_callbacks():
    return [
        HessianCallback(every_n_train_steps=2, top_k=2, trace=True, trace_hvps=9, density=True, density_steps=4),
        SharpnessCallback(every_n_train_steps=3, steps=3, samples=3),
        LossLandscapeCallback(every_n_train_steps=3, steps=3, steps_1d=3),
    ]


def _fit(tmp_path, callbacks, accelerator="cpu"):
    pl.seed_everything(0, verbose=False)
    train, val = loaders(n_train=192, n_val=64, batch_size=32, shuffle=True)
    module = BNDropoutModule()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator=accelerator, max_epochs=2, deterministic=True, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, train, val)
    return {k: v.clone() for k, v in module.state_dict().items()}, [torch.random.get_rng_state()]


def test_all_callbacks_leave_training_bitwise_unchanged(tmp_path):
    callbacks = _all_callbacks()
    with_cbs, rng_with = _fit(tmp_path, callbacks)
    without, rng_without = _fit(tmp_path, [])
    for cb in callbacks:
        assert cb.last_metrics, f"{type(cb).__name__} measured nothing"
    assert with_cbs.keys() == without.keys()
    for key in without:  # weights and BatchNorm buffers (running stats, num_batches_tracked)
        assert torch.equal(with_cbs[key], without[key]), key
    assert torch.equal(rng_with[0], rng_without[0])


DDP_BODY = """
import torch, pytorch_lightning as pl
from _lightning import DigitsModule, loaders
from _models import cross_entropy
from lightning_landscape import HessianCallback, LossLandscapeCallback, SAMMixin, SharpnessCallback


class SAMDigits(SAMMixin, DigitsModule):
    pass


class FailOnRankOne:
    # a loss_fn that raises on rank 1 only, during the first Hessian measurement
    def __init__(self):
        self.calls = 0

    def __call__(self, module, batch):
        self.calls += 1
        # call 1 picks the HVP method; call 2 builds the gradient graph every later product re-uses
        if module.trainer.global_rank == 1 and module.trainer.global_step == 2 and self.calls == 2:
            raise RuntimeError("injected failure on rank 1")
        return cross_entropy(module, batch)


train, val = loaders(n_train=256, n_val=64, batch_size=32)
cbs = [
    HessianCallback(every_n_train_steps=2, top_k=1, loss_fn=FailOnRankOne()),
    SharpnessCallback(every_n_train_steps=2, steps=3, samples=3),
    LossLandscapeCallback(every_n_train_steps=2, steps=3, steps_1d=3),
]
module = SAMDigits(sam=True, lr=0.1)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, default_root_dir=OUT, callbacks=cbs,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     num_sanity_val_steps=0)
trainer.fit(module, train, val)
report({"metrics": [cb.last_metrics for cb in cbs], "steps": trainer.global_step,
        "last_hessian_step": cbs[0]._last_step,
        "weights": [p.detach().double().sum().item() for p in module.parameters()]})
"""


@pytest.mark.slow
def test_ddp_all_callbacks_with_sam(tmp_path):
    r0, r1 = run_ddp(tmp_path, DDP_BODY)
    assert r0["steps"] == r1["steps"] == 4
    assert r0["weights"] == r1["weights"]
    for m0, m1 in zip(r0["metrics"], r1["metrics"], strict=True):
        assert m0, "every callback measured"
        assert {k: v for k, v in m0.items() if not k.endswith("seconds")} == {
            k: v for k, v in m1.items() if not k.endswith("seconds")
        }
    # the failure on rank 1 at step 2 skipped the Hessian measurement on both ranks; step 4 ran
    assert "hessian/eigenvalue_1" in r0["metrics"][0] and r0["last_hessian_step"] == 4
    acc = read_events(tmp_path)
    assert sorted(scalar_steps(acc, "hessian/eigenvalue_1")) == [4]
    assert sorted(scalar_steps(acc, "sharpness/worst_case_l2")) == [2, 4]
    assert [e.step for e in acc.Images("landscape/surface_2d")] == [2, 4]
