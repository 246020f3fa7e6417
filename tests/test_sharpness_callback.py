"""SharpnessCallback in a real Trainer.fit: TensorBoard tags, values against the functional form, the
generalization gap, nothing lost, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from _lightning import DigitsModule, loaders, read_events, scalar_steps, trainer
from _models import cross_entropy

from lightning_landscape.callbacks.sharpness import DEFAULT_KINDS, SharpnessCallback, parse_sharpness_spec
from lightning_landscape.functional.sharpness import sharpness

SHARPNESS_TAGS = {f"sharpness/{k}" for k in DEFAULT_KINDS} | {"sharpness/weight_norm", "sharpness/seconds"}
GAP_TAGS = {"generalization/train_loss", "generalization/val_loss", "generalization/gap"}


def _mean_loss(module, batches) -> float:
    total = sum(len(b[1]) for b in batches)
    with torch.no_grad():
        return sum(len(b[1]) / total * cross_entropy(module, b).item() for b in batches)


def test_tags_in_event_file_and_values_at_the_logged_weights(tmp_path):
    train, val = loaders(n_train=320, n_val=128, batch_size=32)  # 10 steps per epoch
    cb = SharpnessCallback(every_n_train_steps=4, rho=0.05, num_batches=2)
    module = DigitsModule(lr=0.2, momentum=0.9)
    trainer(tmp_path, [cb], max_steps=8).fit(module, train, val)  # the last measurement is at the final weights
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert SHARPNESS_TAGS | GAP_TAGS <= tags
    assert not any(t.startswith("sharpness/generalization") for t in tags)
    for tag in SHARPNESS_TAGS | GAP_TAGS:
        assert sorted(scalar_steps(acc, tag)) == [4, 8], tag
    last = {tag: scalar_steps(acc, tag)[8] for tag in SHARPNESS_TAGS | GAP_TAGS}
    assert last == pytest.approx({k: v for k, v in cb.last_metrics.items()}, rel=1e-6)  # float32 in the file

    # the generalization tags: probe losses at the same weights, and their difference
    assert len(cb._probe) == 2 and len(cb._val_probe) == 2
    assert last["generalization/train_loss"] == pytest.approx(_mean_loss(module, cb._probe), rel=1e-5)
    assert last["generalization/val_loss"] == pytest.approx(_mean_loss(module, cb._val_probe), rel=1e-5)
    gap = last["generalization/val_loss"] - last["generalization/train_loss"]
    assert last["generalization/gap"] == pytest.approx(gap, abs=1e-6)
    assert cb.last_metrics["generalization/gap"] == (
        cb.last_metrics["generalization/val_loss"] - cb.last_metrics["generalization/train_loss"]
    )

    # sharpness: the worst case is deterministic, so the functional form at the final weights repeats it
    for adaptive in (False, True):
        tag = "sharpness/worst_case_l2" + ("_adaptive" if adaptive else "")
        expected = sharpness(module, cross_entropy, cb._probe, 0.05, adaptive=adaptive)
        assert last[tag] == pytest.approx(expected, rel=1e-4), tag
        # a random direction of the same length raises the loss far less than the worst one
        assert 0 < last[tag.replace("worst", "average")] < 0.5 * last[tag]
    norm = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).norm().item()
    assert last["sharpness/weight_norm"] == pytest.approx(norm, rel=1e-6)
    assert last["sharpness/seconds"] > 0


def test_keskar_and_custom_loss_every_epoch(tmp_path):
    train, _ = loaders(n_train=128, batch_size=32)
    calls = []

    def loss_fn(module, batch):
        calls.append(1)
        return cross_entropy(module, batch)

    cb = SharpnessCallback(every_n_epochs=1, rho=1e-3, kinds=["keskar", ("worst_case", "linf", True)], loss_fn=loss_fn)
    module = DigitsModule(lr=0.1)
    trainer(tmp_path, [cb], max_epochs=2, logger=False).fit(module, train)  # no val loader
    assert cb._last_epoch == 2 and calls
    assert set(cb.last_metrics) == {
        "sharpness/keskar_linf",
        "sharpness/worst_case_linf_adaptive",
        "sharpness/weight_norm",
        "sharpness/seconds",
    }
    expected = sharpness(module, cross_entropy, cb._probe, 1e-3, kind="keskar")
    assert cb.last_metrics["sharpness/keskar_linf"] == pytest.approx(expected, rel=1e-4)
    assert cb.last_metrics["sharpness/keskar_linf"] > 0


def test_one_radius_per_measure(tmp_path):
    # Keskar at its paper's epsilon beside the worst case at SAM's radius, in one callback
    train, _ = loaders(n_train=128, batch_size=32)
    rho = {"worst_case_l2": 0.05, "keskar_linf": 1e-3}
    cb = SharpnessCallback(every_n_epochs=1, rho=rho, kinds=["worst_case_l2", "keskar"])
    module = DigitsModule(lr=0.1)
    trainer(tmp_path, [cb], max_epochs=1, logger=False).fit(module, train)
    for kind, radius in (("worst_case", 0.05), ("keskar", 1e-3)):
        expected = sharpness(module, cross_entropy, cb._probe, radius, kind=kind)
        tag = "sharpness/keskar_linf" if kind == "keskar" else "sharpness/worst_case_l2"
        assert cb.last_metrics[tag] == pytest.approx(expected, rel=1e-4), tag
    # the radius matters: Keskar at 0.05 is far larger than at 1e-3
    wide = sharpness(module, cross_entropy, cb._probe, 0.05, kind="keskar")
    assert wide > 10 * cb.last_metrics["sharpness/keskar_linf"]
    assert "keskar_linf" in cb.state_key


def test_training_unchanged_by_callback(tmp_path):
    """Same fit with and without the callback (every kind, val probe included): bitwise-equal weights."""
    results = []
    kinds = ["worst_case_l2", "worst_case_linf_adaptive", "average_case_l2_adaptive", "average_case_linf", "keskar"]
    for callbacks in ([], [SharpnessCallback(every_n_train_steps=2, kinds=kinds, steps=3, samples=2)]):
        torch.manual_seed(0)
        train, val = loaders(batch_size=32)
        module = DigitsModule(lr=0.1, momentum=0.9)
        trainer(tmp_path, callbacks, max_epochs=2, deterministic=True, logger=False).fit(module, train, val)
        results.append({k: v.clone() for k, v in module.state_dict().items()})
        if callbacks:
            assert "generalization/gap" in callbacks[0].last_metrics
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_generalization_off_and_state_dict(tmp_path):
    train, val = loaders(n_train=64, batch_size=32)
    cb = SharpnessCallback(every_n_train_steps=1, kinds=["average_case_l2"], samples=2, generalization=False)
    trainer(tmp_path, [cb], max_steps=2, logger=False).fit(DigitsModule(), train, val)
    assert set(cb.last_metrics) == {"sharpness/average_case_l2", "sharpness/weight_norm", "sharpness/seconds"}
    assert cb._val_probe is None
    restored = SharpnessCallback(every_n_train_steps=1, kinds=["average_case_l2"])
    restored.load_state_dict(copy.deepcopy(cb.state_dict()))
    assert restored._last_step == 2
    assert torch.equal(restored.generator.get_state(), cb.generator.get_state())
    assert cb.state_key != SharpnessCallback(every_n_train_steps=1, kinds=["worst_case_l2"]).state_key


def test_failed_measurement_warns_and_training_goes_on(tmp_path):
    train, _ = loaders(n_train=64, batch_size=32)
    cb = SharpnessCallback(
        every_n_train_steps=1,
        steps=2,
        samples=1,
        loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
    )
    module = DigitsModule()
    with pytest.warns(UserWarning, match="skipped the measurement"):
        trainer(tmp_path, [cb], max_steps=2, logger=False).fit(module, train)
    assert module.trainer.global_step == 2
    assert cb.last_metrics == {}


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("worst_case_l2", ("worst_case", "l2", False)),
        ("worst_case_linf_adaptive", ("worst_case", "linf", True)),
        ("average_case_l2_adaptive", ("average_case", "l2", True)),
        ("keskar", ("keskar", "linf", False)),
        ("keskar_linf", ("keskar", "linf", False)),
        (("average_case", "linf"), ("average_case", "linf", False)),
        (("worst_case", "l2", True), ("worst_case", "l2", True)),
    ],
)
def test_spec_parsing(spec, parsed):
    assert parse_sharpness_spec(spec) == parsed


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(every_n_train_steps=1, every_n_epochs=1), "every_n_train_steps"),
        (dict(every_n_epochs=1, max_overhead=0.1), "max_overhead"),
        (dict(every_n_epochs=1, rho=0), "rho"),
        (dict(every_n_epochs=1, rho=-1.0), "rho"),
        (dict(every_n_epochs=1, kinds=["sharpest_l2"]), "kinds"),
        (dict(every_n_epochs=1, kinds=["worst_case_l3"]), "kinds"),
        (dict(every_n_epochs=1, kinds=[("keskar", "l2")]), "kinds"),
        (dict(every_n_epochs=1, kinds=["keskar_linf_adaptive"]), "kinds"),
        (dict(every_n_epochs=1, kinds=[("worst_case", "l2", "yes")]), "kinds"),
        (dict(every_n_epochs=1, kinds=[3]), "kinds"),
        (dict(every_n_epochs=1, kinds=["worst_case_l2", ("worst_case", "l2")]), "kinds"),
        (dict(every_n_epochs=1, kinds=7), "kinds"),
        (dict(every_n_epochs=1, kinds=[], generalization=False), "kinds"),
        (dict(every_n_epochs=1, steps=0), "steps"),
        (dict(every_n_epochs=1, samples=0), "samples"),
        (dict(every_n_epochs=1, eta=-0.1), "eta"),
        (dict(every_n_epochs=1, num_batches=0), "num_batches"),
        (dict(every_n_epochs=1, loss_fn="mse"), "loss_fn"),
        (dict(every_n_epochs=1, generalization="yes"), "generalization"),
        (dict(every_n_epochs=1, rho={"worst_case_l2": 0.05}), "rho"),  # the other defaults have no radius
        (dict(every_n_epochs=1, kinds=["keskar"], rho={"keskar_linf": 1e-3, "keskar": 1}), "rho"),
        (dict(every_n_epochs=1, kinds=["keskar"], rho={"keskar_linf": 0}), "rho"),
        (dict(every_n_epochs=1, kinds=["keskar"], rho={"keskar_linf": "small"}), "rho"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        SharpnessCallback(**kwargs)


def test_kinds_error_lists_the_accepted_values():
    with pytest.raises(ValueError) as info:
        SharpnessCallback(every_n_epochs=1, kinds=["flatness_l2"])
    message = str(info.value)
    assert all(word in message for word in ("worst_case", "average_case", "keskar", "l2", "linf", "flatness_l2"))


def test_blocks_measure_each_block_alone(tmp_path):
    """``blocks="module"`` on DigitsModule (its network in ``self.net``): the network's layers are the blocks, and
    each block's worst case is the functional one with only that block's parameters perturbed."""
    train, _ = loaders(n_train=128, batch_size=32)
    cb = SharpnessCallback(every_n_epochs=1, kinds=["worst_case_l2"], num_batches=2, blocks="module")
    module = DigitsModule(lr=0.2)
    trainer(tmp_path, [cb], max_epochs=1).fit(module, train)
    assert cb._block_params == {"0": ["net.0.weight", "net.0.bias"], "2": ["net.2.weight", "net.2.bias"]}
    whole = cb.last_metrics["sharpness/worst_case_l2"]
    for block, names in cb._block_params.items():
        expected = sharpness(module, cross_entropy, cb._probe, 0.05, params=names)
        assert cb.last_metrics[f"sharpness/{block}/worst_case_l2"] == pytest.approx(expected, rel=1e-4)
        assert 0 < expected < whole  # a ball in fewer coordinates reaches less high
    assert f"sharpness/{next(iter(cb._block_params))}/worst_case_l2" in read_events(tmp_path).Tags()["scalars"]


@pytest.mark.parametrize(
    ("blocks", "match"),
    [("layers", "`blocks` must be None, one of"), ({"head": 3}, r"`blocks`\['head'\] must be"), ({}, "`blocks`")],
)
def test_bad_blocks_are_refused_when_built(blocks, match):
    with pytest.raises(ValueError, match=match):
        SharpnessCallback(blocks=blocks)


def test_blocks_pattern_matching_nothing_is_refused_at_fit_start(tmp_path):
    train, _ = loaders(n_train=64, batch_size=32)
    cb = SharpnessCallback(every_n_epochs=1, num_batches=1, blocks={"encoder": "encoder.*"})
    with pytest.raises(ValueError, match=r"SharpnessCallback: `blocks`.*encoder"):
        trainer(tmp_path, [cb], max_epochs=1).fit(DigitsModule(), train)
