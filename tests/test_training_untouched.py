"""Attaching the callbacks never changes what the training loop sees or what the user logs (issue 12, classes 1-3).

Each test fails on the plugin before the fix: the probe drawn from a persistent-worker loader changed the weights,
a one-shot stream lost a batch to the probe, a dict of loaders gave the probe the wrong structure, true-precision
training never measured, and torchmetrics / plain attributes updated in ``training_step`` were updated by every
measurement too.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch
from _lightning import DigitsModule, loaders
from _models import cross_entropy, digits
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_landscape.functional as LF
from lightning_landscape import HessianCallback, LossLandscapeCallback, SharpnessCallback


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1, logger=False, deterministic=True,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=callbacks,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(**options)


def _all(every: int = 2, **kw):
    kw.setdefault("num_batches", 1)
    return [
        HessianCallback(every_n_train_steps=every, top_k=2, max_hvps=20, **kw),
        SharpnessCallback(every_n_train_steps=every, steps=3, samples=2, **kw),
        LossLandscapeCallback(every_n_train_steps=every, steps=3, steps_1d=3, **kw),
    ]


def _fit_skips(trainer, module, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, *args)
    return [str(w.message) for w in caught if "skipped the measurement" in str(w.message)]


# ------------------------------------------------------------------------------------------ class 1: the data
def _persistent_loader() -> DataLoader:
    x, y = digits(192)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, num_workers=1, persistent_workers=True)


@pytest.mark.slow
def test_persistent_workers_loader_is_never_iterated_by_the_plugin(tmp_path):
    def fit(callbacks):
        pl.seed_everything(0, verbose=False)
        module = DigitsModule()
        _trainer(tmp_path, callbacks, max_epochs=2).fit(module, _persistent_loader())
        return {k: v.clone() for k, v in module.state_dict().items()}, torch.random.get_rng_state()

    bare, rng_bare = fit([])
    idle, rng_idle = fit([HessianCallback(every_n_epochs=100)])  # attached, never measures
    measuring, rng_measuring = fit([HessianCallback(every_n_train_steps=3, max_hvps=10)])
    for other, rng in ((idle, rng_idle), (measuring, rng_measuring)):
        assert all(torch.equal(bare[k], other[k]) for k in bare)
        assert torch.equal(rng_bare, rng)


class _Stream(IterableDataset):
    """A one-shot stream of batches (a reader that cannot rewind): a second iterator gets nothing new."""

    def __init__(self, batches: list) -> None:
        self.queue = list(batches)

    def __iter__(self):
        while self.queue:
            yield self.queue.pop(0)


class _Recording(DigitsModule):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.seen.append(int(batch[2][0]))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x), y)


def test_a_one_shot_stream_loses_no_batch(tmp_path):
    x, y = digits(192)
    batches = [(x[i : i + 32], y[i : i + 32], torch.full((32,), i // 32)) for i in range(0, 192, 32)]
    module = _Recording()
    callbacks = _all()
    skips = _fit_skips(_trainer(tmp_path, callbacks), module, DataLoader(_Stream(batches), batch_size=None))
    assert module.seen == [0, 1, 2, 3, 4, 5]  # every batch trained on, in order
    assert not skips
    for cb in callbacks:
        assert cb.last_metrics, type(cb).__name__
        assert torch.equal(cb._probe[0][2], batches[0][2])  # the probe is a copy of the first batch


class _TwoSources(DigitsModule):
    def training_step(self, batch, batch_idx):
        (xa, ya), (xb, yb) = batch["a"], batch["b"]
        return nn.functional.cross_entropy(self(xa), ya) + 0.5 * nn.functional.cross_entropy(self(xb), yb)


def test_several_train_loaders_give_the_probe_their_combined_structure(tmp_path):
    train, _ = loaders(n_train=192, batch_size=32)
    other, _ = loaders(n_train=96, batch_size=16)
    callbacks = _all()
    module = _TwoSources()
    skips = _fit_skips(_trainer(tmp_path, callbacks), module, {"a": train, "b": other})
    assert not skips, skips
    probe = callbacks[0]._probe[0]
    assert set(probe) == {"a", "b"} and probe["a"][0].shape == (32, 64) and probe["b"][0].shape == (16, 64)
    # the measured loss is the two-source loss on that batch: the landscape's centre is it
    expected = float(module.training_step(probe, 0))
    assert callbacks[2].last_metrics["landscape/center_loss"] == pytest.approx(expected, rel=1e-5)


def test_an_unsafe_val_loader_is_copied_as_validation_runs(tmp_path):
    x, y = digits(256)
    train = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32)
    stream = [(x[i : i + 32], y[i : i + 32]) for i in range(192, 256, 32)]

    class Module(DigitsModule):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", cross_entropy(self, batch))

    cb = SharpnessCallback(every_n_epochs=1, kinds=["worst_case_l2"], steps=2, num_batches=2)
    trainer = _trainer(tmp_path, [cb], num_sanity_val_steps=2, max_epochs=2)
    trainer.fit(Module(), train, DataLoader(_Stream(stream * 3), batch_size=None))
    assert "generalization/val_loss" in cb.last_metrics
    assert torch.equal(cb._val_probe[0][0], stream[0][0])


# ------------------------------------------------------------------------------------------ class 2: precision
@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "16-true"])
def test_every_precision_measures_and_agrees_with_float32(tmp_path, precision):
    pl.seed_everything(0, verbose=False)
    train, _ = loaders(n_train=128, batch_size=64)
    callbacks = _all(every=2)
    module = DigitsModule()
    skips = _fit_skips(_trainer(tmp_path, callbacks, precision=precision), module, train)
    assert not skips, skips
    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16, "16-true": torch.float16}[precision]
    probe = callbacks[0]._probe
    assert probe[0][0].dtype == dtype  # converted by the precision plugin, as training's inputs
    # the float32 functional result on the same weights (half weights upcast exactly; float64 rounded to float32)
    twin = copy.deepcopy(module.net).float()
    batches = [(b[0].float(), b[1]) for b in probe]
    exact = LF.hessian_eigenvalues(twin, cross_entropy, batches, k=2, tol=1e-7, max_hvps=200).eigenvalues
    got = torch.tensor([callbacks[0].last_metrics[f"hessian/eigenvalue_{i}"] for i in (1, 2)], dtype=torch.float64)
    # the callback's solver stops at tol=1e-3; float64 vs float32 arithmetic differs by ~1e-6
    torch.testing.assert_close(got, exact, rtol=2e-3, atol=0)
    with LF.LossOperator(twin, cross_entropy, batches) as op:
        center = float(op.loss())
    # the landscape's centre: float32 rounding of the loss (the model computes in float32 for half weights)
    assert callbacks[2].last_metrics["landscape/center_loss"] == pytest.approx(center, rel=1e-5)
    assert all(p.dtype == dtype for p in module.parameters())


# ------------------------------------------------------------------------------------------ class 3: user state
class _Metered(DigitsModule):
    def __init__(self) -> None:
        super().__init__()
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.outputs: list[float] = []
        self.steps_seen = 0
        self.epoch_accs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits.argmax(-1), y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        self.outputs.append(float(loss))
        self.steps_seen += 1
        return loss

    def on_train_epoch_end(self):
        self.epoch_accs.append(float(self.train_acc.compute()))


def test_default_loss_leaves_metrics_and_attributes_as_training_made_them(tmp_path):
    def fit(callbacks):
        pl.seed_everything(0, verbose=False)
        train, _ = loaders(n_train=256, batch_size=32)
        module = _Metered()
        trainer = _trainer(tmp_path, callbacks, max_epochs=2)
        trainer.fit(module, train)
        return module, {k: float(v) for k, v in trainer.callback_metrics.items()}

    bare, logged_bare = fit([])
    measured, logged = fit(_all(every=3))
    assert measured.steps_seen == bare.steps_seen == 16
    assert measured.outputs == bare.outputs
    assert measured.epoch_accs == bare.epoch_accs
    assert logged == logged_bare
