"""LossLandscapeCallback in a real Trainer.fit: frames in TensorBoard, fixed directions, resume, divergence."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _ddp import run_ddp
from _lightning import DigitsModule, fitted_weights, loaders, read_events, scalar_steps, trainer
from _models import cross_entropy

import lightning_landscape.callbacks.landscape as landscape_module
from lightning_landscape.callbacks.landscape import LossLandscapeCallback
from lightning_landscape.functional.surface import filter_normalize, loss_line, loss_surface

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def recorded(monkeypatch):
    """The raw directions the callback hands to ``filter_normalize`` at each frame."""
    seen: list[torch.Tensor] = []

    def spy(model, directions, *args, **kwargs):
        seen.append(directions)
        return filter_normalize(model, directions, *args, **kwargs)

    monkeypatch.setattr(landscape_module, "filter_normalize", spy)
    return seen


def test_frames_in_event_file_and_fixed_directions(tmp_path, recorded):
    train, val = loaders(n_train=256, n_val=128, batch_size=64)  # 4 steps per epoch
    cb = LossLandscapeCallback(every_n_train_steps=2, steps=7, steps_1d=9, distance=0.5, loss_fn=cross_entropy)
    module = DigitsModule(lr=0.3)
    trainer(tmp_path, [cb], max_epochs=2).fit(module, train, val)

    acc = read_events(tmp_path)
    scheduled = [2, 4, 6, 8]
    assert [e.step for e in acc.Images("landscape/surface_2d")] == scheduled
    assert [e.step for e in acc.Images("landscape/slice_1d")] == scheduled
    for tag in ("center_loss", "rise_at_edge", "nonfinite_fraction", "seconds"):
        assert sorted(scalar_steps(acc, f"landscape/{tag}")) == scheduled, tag

    # one draw from the callback's own generator, the same tensor at every frame
    assert len(recorded) == 4 and all(d is recorded[0] for d in recorded)
    assert torch.equal(recorded[0], torch.randn(2, 1810, generator=torch.Generator().manual_seed(0)))
    assert cb.directions is recorded[0]

    # the last frame's scalars are those of the slice at the final weights, recomputed independently
    dirs = filter_normalize(module, cb.directions)
    s = loss_surface(module, cross_entropy, cb._probe, steps=7, distance=0.5, directions=dirs)
    last = {tag: scalar_steps(acc, f"landscape/{tag}")[8] for tag in ("center_loss", "rise_at_edge")}
    assert last["center_loss"] == pytest.approx(s.center_loss, rel=1e-6)  # float32 event values
    assert last["rise_at_edge"] == pytest.approx(s.rise_at_edge(), rel=1e-5)
    assert scalar_steps(acc, "landscape/nonfinite_fraction")[8] == 0.0
    # trained weights sit lower than their neighbourhood along random directions
    assert all(v > 0 for v in scalar_steps(acc, "landscape/rise_at_edge").values())
    # the 1D overlay used fixed validation batches
    assert cb._val_probe is not None and sum(len(b[1]) for b in cb._val_probe) == 128  # all 128 (< 256 default)


def test_training_unchanged_by_callback(tmp_path):
    """Same fit with and without the callback: bitwise-equal weights (CPU, deterministic)."""
    plain = fitted_weights(tmp_path, [], n_train=192, validate=True)
    cb = LossLandscapeCallback(every_n_train_steps=3, steps=5, steps_1d=5)
    watched = fitted_weights(tmp_path, [cb], n_train=192, validate=True)
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_resume_continues_the_same_frames(tmp_path, recorded):
    train, _ = loaders(n_train=128, batch_size=64)
    cb = LossLandscapeCallback(every_n_epochs=1, steps=3, steps_1d=3)
    first = trainer(tmp_path, [cb], max_epochs=1, logger=False)
    first.fit(DigitsModule(lr=0.1), train)
    path = tmp_path / "resume.ckpt"
    first.save_checkpoint(path)

    state = cb.state_dict()
    twin = LossLandscapeCallback(every_n_epochs=1, steps=3, steps_1d=3)
    twin.load_state_dict(copy.deepcopy(state))
    assert torch.equal(twin.directions, cb.directions) and twin._last_epoch == 1
    assert torch.equal(twin.generator.get_state(), cb.generator.get_state())

    resumed = LossLandscapeCallback(every_n_epochs=1, steps=3, steps_1d=3)
    trainer(tmp_path, [resumed], max_epochs=3, logger=False).fit(DigitsModule(lr=0.1), train, ckpt_path=path)
    assert len(recorded) == 3  # one frame before the checkpoint, two after it
    assert all(torch.equal(d, recorded[0]) for d in recorded)
    assert resumed._last_epoch == 3


def _diverging_far_away(threshold: float):
    """Cross-entropy, but NaN wherever the first layer's weight norm exceeds ``threshold``."""

    def loss_fn(module, batch):
        loss = cross_entropy(module, batch)
        too_far = module.net[0].weight.norm() > threshold
        return torch.where(too_far, torch.full_like(loss, math.nan), loss)

    return loss_fn


def test_divergent_points_are_nan_and_training_goes_on(tmp_path):
    train, val = loaders(n_train=128, batch_size=64)
    module = DigitsModule(lr=0.0)  # the weights stay where they are: the frame can be recomputed exactly
    # filter-normalized directions are nearly orthogonal to θ: ‖θ + aδ + bη‖ ≈ ‖θ‖·sqrt(1 + a² + b²), so about
    # the points with a² + b² > 3 diverge
    threshold = 2.0 * float(module.net[0].weight.detach().norm())
    loss_fn = _diverging_far_away(threshold)
    cb = LossLandscapeCallback(every_n_epochs=1, steps=7, steps_1d=9, distance=2.0, loss_fn=loss_fn, strict=True)
    trainer(tmp_path, [cb], max_epochs=2).fit(module, train, val)

    dirs = filter_normalize(module, cb.directions)
    s = loss_surface(module, loss_fn, cb._probe, steps=7, distance=2.0, directions=dirs)
    fraction = s.nonfinite_fraction
    assert 0.1 < fraction < 0.9  # the test exercises both kinds of point
    acc = read_events(tmp_path)
    assert scalar_steps(acc, "landscape/nonfinite_fraction") == {2: pytest.approx(fraction), 4: pytest.approx(fraction)}
    assert scalar_steps(acc, "landscape/center_loss")[4] == pytest.approx(s.center_loss, rel=1e-6)
    assert math.isfinite(scalar_steps(acc, "landscape/rise_at_edge")[4])
    assert scalar_steps(acc, "landscape/rise_at_edge")[4] == pytest.approx(s.rise_at_edge(), rel=1e-5)
    assert [e.step for e in acc.Images("landscape/surface_2d")] == [2, 4]
    line = loss_line(module, loss_fn, cb._val_probe, steps=9, distance=2.0, direction=dirs[0])
    assert line.losses.isnan().any() and line.losses[4].isfinite()


def test_bad_arguments_name_the_argument():
    for kwargs, name in [
        ({"steps": 10}, "steps"),
        ({"steps": 1}, "steps"),
        ({"steps": 3.0}, "steps"),
        ({"steps_1d": 4}, "steps_1d"),
        ({"steps_1d": 0}, "steps_1d"),
        ({"distance": 0}, "distance"),
        ({"distance": -0.5}, "distance"),
        ({"distance": math.nan}, "distance"),
        ({"num_batches": 0}, "num_batches"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            LossLandscapeCallback(every_n_epochs=1, **kwargs)
    with pytest.raises(TypeError, match="`include_1d`"):
        LossLandscapeCallback(every_n_epochs=1, include_1d="yes")
    with pytest.raises(ValueError, match="every_n_train_steps"):
        LossLandscapeCallback(every_n_epochs=1, every_n_train_steps=5)
    with pytest.raises(TypeError, match="`loss_fn`"):
        LossLandscapeCallback(every_n_epochs=1, loss_fn=3)


BODY = """
import torch, pytorch_lightning as pl
from _lightning import DigitsModule, loaders
from _models import cross_entropy
from lightning_landscape.callbacks.landscape import LossLandscapeCallback
from lightning_landscape.functional.surface import filter_normalize, loss_surface

train, val = loaders(n_train=256, batch_size=32, shuffle=True)
cb = LossLandscapeCallback(every_n_train_steps=2, steps=5, steps_1d=5, loss_fn=cross_entropy, num_batches=1)
module = DigitsModule(lr=0.1)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, default_root_dir=OUT, callbacks=[cb],
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.fit(module, train, val)
(x, y), = cb._probe
xs, ys = trainer.strategy.all_gather(x), trainer.strategy.all_gather(y)
dirs = filter_normalize(module, cb.directions)
pooled = loss_surface(module, cross_entropy, [(xs[0], ys[0]), (xs[1], ys[1])], steps=5, directions=dirs)
own = loss_surface(module, cross_entropy, cb._probe, steps=5, directions=dirs)
report({"metrics": cb.last_metrics, "pooled": [pooled.center_loss, pooled.rise_at_edge()],
        "own": own.center_loss, "directions": cb.directions.sum().item()})
"""


@pytest.mark.slow
def test_ddp_ranks_agree_and_pool_probe_data(tmp_path):
    r0, r1 = run_ddp(tmp_path, BODY)
    m0, m1 = r0["metrics"], r1["metrics"]
    assert m0["landscape/center_loss"] == m1["landscape/center_loss"]
    assert m0["landscape/rise_at_edge"] == m1["landscape/rise_at_edge"]
    assert r0["directions"] == r1["directions"]
    # the logged slice is that of both ranks' probe batches together, not of either alone
    assert m0["landscape/center_loss"] == pytest.approx(r0["pooled"][0], rel=1e-5)
    assert m0["landscape/rise_at_edge"] == pytest.approx(r0["pooled"][1], rel=1e-4)
    assert r0["own"] != pytest.approx(r0["pooled"][0], rel=1e-4) or r1["own"] != pytest.approx(
        r0["pooled"][0], rel=1e-4
    )


def test_surface_3d_mesh_in_tensorboard(tmp_path):
    """The 2D slice as a TensorBoard mesh: a vertex per grid point (plus θ's marker), at the grid's coordinates."""
    from tensorboard.util import tensor_util

    train, val = loaders(n_train=128, batch_size=64)
    cb = LossLandscapeCallback(every_n_epochs=1, steps=5, steps_1d=5, loss_fn=cross_entropy)
    trainer(tmp_path, [cb], max_epochs=1).fit(DigitsModule(lr=0.1), train, val)
    acc = read_events(tmp_path)
    events = acc.Tensors("landscape/surface_3d_VERTEX")
    assert [e.step for e in events] == [2]
    assert [e.step for e in acc.Tensors("landscape/surface_3d_FACE")] == [2]
    vertices = tensor_util.make_ndarray(events[0].tensor_proto)[0]
    assert vertices.shape == (25 + 4, 3)  # 5x5 grid, then the 4 corners of θ's marker
    grid = torch.linspace(-1.0, 1.0, 5)
    expected = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 2)
    assert torch.allclose(torch.from_numpy(vertices[:25, :2]), expected, atol=1e-6)
    assert vertices[:25, 2].min() == 0.0  # the lowest loss of the slice sits at height 0


def test_mesh_can_be_left_out(tmp_path):
    train, _ = loaders(n_train=64, batch_size=64)
    cb = LossLandscapeCallback(every_n_epochs=1, steps=3, steps_1d=3, loss_fn=cross_entropy, mesh=False)
    trainer(tmp_path, [cb], max_epochs=1).fit(DigitsModule(lr=0.1), train)
    assert "landscape/surface_3d_VERTEX" not in read_events(tmp_path).Tags()["tensors"]
