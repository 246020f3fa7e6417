"""TrajectoryCallback in a real Trainer.fit: snapshots on disk, thinning, the plane in TensorBoard, resume, DDP."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _ddp import run_ddp
from _lightning import DigitsModule, fitted_weights, loaders, read_events, scalar_steps, trainer
from _models import cross_entropy
from pytorch_lightning.callbacks import ModelCheckpoint
from test_trajectory import numpy_pca

from lightning_landscape.callbacks.trajectory import TrajectoryCallback
from lightning_landscape.functional.trajectory import trajectory_surface

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshots(cb: TrajectoryCallback) -> list[torch.Tensor]:
    return [torch.load(p) for p in cb.store.paths]


def _weights(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_snapshots_thinning_and_the_plane_in_tensorboard(tmp_path):
    train, val = loaders(n_train=256, batch_size=32)  # 8 steps per epoch
    cb = TrajectoryCallback(every_n_epochs=1, snapshot_every_n_train_steps=1, max_snapshots=6, steps=5, margin=0.3,
                            loss_fn=cross_entropy, num_batches=1)  # fmt: skip
    module = DigitsModule(lr=0.3)
    trainer(tmp_path, [cb], max_epochs=2).fit(module, train, val)

    # steps 0..16, thinned whenever more than 6 are kept: the interval doubled 1 -> 2 -> 4
    assert cb.store.steps == [0, 4, 8, 12, 16] and cb._interval == 4
    on_disk = sorted(os.listdir(os.path.join(tmp_path, "lightning_logs", "version_0", "trajectory")))
    assert len(on_disk) == 5  # no checkpointing: dropped files were deleted at once
    assert torch.equal(_snapshots(cb)[-1], _weights(module))  # the final weights end the path
    assert torch.equal(_snapshots(cb)[0], torch.load(cb.store.paths[0]))

    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("landscape/trajectory")] == [8, 16]
    ev = [scalar_steps(acc, f"landscape/trajectory_explained_variance_{k}") for k in (1, 2)]
    assert sorted(ev[0]) == [8, 16] and sorted(ev[1]) == [8, 16]
    assert sorted(scalar_steps(acc, "landscape/trajectory/seconds")) == [8, 16]
    mesh_steps = [e.step for e in acc.Tensors("landscape/trajectory_3d_VERTEX")]
    assert mesh_steps == [8, 16]

    # the last plane is the PCA of the stored snapshots around the final weights (dense numpy reference),
    # and its grid the loss on that plane (recomputed independently)
    center = _weights(module)
    dirs, coords, ratio = numpy_pca(_snapshots(cb), center)
    plane = cb.last_surface.plane
    np.testing.assert_allclose(plane.directions.numpy(), dirs, atol=1e-6)  # float64 both sides (see test_trajectory)
    np.testing.assert_allclose(plane.coords.numpy(), coords, atol=1e-6 * np.abs(coords).max())
    assert ev[0][16] == pytest.approx(ratio[0], rel=1e-6) and ev[1][16] == pytest.approx(ratio[1], rel=1e-6)
    again = trajectory_surface(module, cross_entropy, cb._probe, plane, steps=5, margin=0.3)
    torch.testing.assert_close(cb.last_surface.losses, again.losses, rtol=0, atol=0)


def test_training_unchanged_by_callback(tmp_path):
    """Same fit with and without the callback: bitwise-equal weights (CPU, deterministic)."""
    plain = fitted_weights(tmp_path, [], n_train=192, validate=True)
    cb = TrajectoryCallback(every_n_train_steps=4, snapshot_every_n_train_steps=1, steps=3)
    watched = fitted_weights(tmp_path, [cb], n_train=192, validate=True)
    assert cb.last_metrics and len(cb.store) == 13
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_resume_keeps_the_snapshots(tmp_path):
    train, _ = loaders(n_train=128, batch_size=32)  # 4 steps per epoch
    kwargs = dict(every_n_epochs=1, snapshot_every_n_epochs=1, steps=3, num_batches=1, directory=tmp_path / "snaps")
    cb = TrajectoryCallback(**kwargs)
    first = trainer(tmp_path, [cb], max_epochs=2, logger=False)
    first.fit(DigitsModule(lr=0.1), train)
    assert cb.store.steps == [0, 4, 8]
    path = tmp_path / "resume.ckpt"
    first.save_checkpoint(path)
    kept = list(cb.store.paths)

    resumed = TrajectoryCallback(**kwargs)
    module = DigitsModule(lr=0.1)
    trainer(tmp_path, [resumed], max_epochs=4, logger=False).fit(module, train, ckpt_path=path)
    assert resumed.store.steps == [0, 4, 8, 12, 16]
    assert resumed.store.paths[:3] == kept  # the same files, not copies
    assert resumed.last_surface.plane.steps == [0, 4, 8, 12, 16]
    dirs, _, _ = numpy_pca([torch.load(p) for p in resumed.store.paths], _weights(module))
    np.testing.assert_allclose(resumed.last_surface.plane.directions.numpy(), dirs, atol=1e-6)


def test_bad_arguments_name_the_argument(tmp_path):
    for kwargs, name in [
        ({"max_snapshots": 5}, "max_snapshots"),
        ({"max_snapshots": 2}, "max_snapshots"),
        ({"snapshot_dtype": "int8"}, "snapshot_dtype"),
        ({"steps": 2}, "steps"),
        ({"margin": -0.1}, "margin"),
        ({"snapshot_every_n_train_steps": 0}, "snapshot_every_n_train_steps"),
        ({"snapshot_every_n_epochs": 1, "snapshot_every_n_train_steps": 1}, "snapshot_every_n_train_steps"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            TrajectoryCallback(every_n_epochs=1, **kwargs)
    with pytest.raises(TypeError, match="`centered`"):
        TrajectoryCallback(centered="yes")
    assert TrajectoryCallback(snapshot_dtype="bfloat16").snapshot_dtype == torch.bfloat16

    class FSDPStrategy:  # stands for Lightning's FSDP1: refused by class name at setup (FSDP2 is measured)
        pass

    class ModelParallelStrategy:  # with tensor parallelism: refused (FSDP2's data-parallel sharding is measured:
        _tensor_parallel_size = 2  # tests/test_trajectory_sharded.py)

    for strategy, match in ((FSDPStrategy(), "FSDPStrategy"), (ModelParallelStrategy(), "tensor_parallel_size=2")):
        with pytest.raises(RuntimeError, match=match):
            TrajectoryCallback().setup(SimpleNamespace(strategy=strategy), None, "fit")


def test_dropped_files_are_deleted_at_the_next_checkpoint(tmp_path):
    train, _ = loaders(n_train=192, batch_size=32)  # 6 steps
    directory = tmp_path / "snaps"
    cb = TrajectoryCallback(snapshot_every_n_train_steps=1, max_snapshots=4, steps=3, num_batches=1,
                            directory=directory)  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=100, save_last=False)  # no save in the fit
    fit = trainer(tmp_path, [cb, ckpt], max_epochs=1, logger=False, enable_checkpointing=True)
    fit.fit(DigitsModule(lr=0.1), train)
    # steps 0..4 thinned to 0, 2, 4 (interval 2), then 6; the files of steps 1 and 3 wait for a checkpoint
    assert cb.store.steps == [0, 2, 4, 6] and len(cb._retired) == 2
    assert len(os.listdir(directory)) == 6
    fit.save_checkpoint(tmp_path / "now.ckpt")
    assert sorted(os.listdir(directory)) == sorted(os.path.basename(p) for p in cb.store.paths)


BODY = """
import os, torch, pytorch_lightning as pl
from _lightning import DigitsModule, loaders
from _models import cross_entropy
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_landscape.callbacks.trajectory import TrajectoryCallback

train, val = loaders(n_train=256, batch_size=32, shuffle=True)
cb = TrajectoryCallback(every_n_train_steps=4, snapshot_every_n_train_steps=1, steps=3, loss_fn=cross_entropy,
                        num_batches=1)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, default_root_dir=OUT, callbacks=[cb],
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.fit(DigitsModule(lr=0.1), train)
report({"metrics": cb.last_metrics, "snapshots": None if cb.store is None else cb.store.steps,
        "losses": cb.last_surface.losses.tolist(), "dir": cb.last_surface.plane.directions.sum().item()})
"""


@pytest.mark.slow
def test_ddp_rank_zero_keeps_snapshots_and_ranks_agree(tmp_path):
    r0, r1 = run_ddp(tmp_path, BODY)
    assert r0["snapshots"] == [0, 1, 2, 3, 4] and r1["snapshots"] is None
    assert r0["metrics"]["landscape/trajectory_explained_variance_1"] > 0
    same = [k for k in r0["metrics"] if "seconds" not in k]
    assert same and all(r0["metrics"][k] == r1["metrics"][k] for k in same)
    assert r0["losses"] == r1["losses"] and r0["dir"] == r1["dir"]
