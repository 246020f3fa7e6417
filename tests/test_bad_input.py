"""Bad input, table-driven: every public constructor argument's invalid values raise at construction
(or at ``setup`` for what depends on the Trainer), with a message naming the argument."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from _lightning import DigitsModule, loaders, trainer

from lightning_landscape import HessianCallback, LossLandscapeCallback, SAMMixin, SharpnessCallback

SCHEDULE = {"every_n_epochs": 1}

# (argument, invalid values) shared by the three callbacks
COMMON = [
    ("every_n_train_steps", [0, -1, 1.5, "2", True]),
    ("every_n_epochs", [0, -3, 2.0, "1", False]),
    ("num_batches", [0, -1, 1.5, "1"]),
    ("num_samples", [0, -1, 2.5, "512"]),
    ("loss_fn", ["mse", 3]),
    ("eval_mode", ["yes", 1, None]),
    ("strict", ["no", 0, None]),
    ("seed", [1.5, "0", None, True, -1, 2**64, 2**70]),
    ("max_overhead", [0, -0.05, 1.5, float("nan"), "5%", True]),
]
SPECIFIC = {
    HessianCallback: [
        ("top_k", [0, -1, 2.5, "3"]),
        ("trace", ["yes", 1]),
        ("density", ["no", 0]),
        ("tol", [0, -1e-3, 1.0, "small"]),
        ("max_hvps", [0, -5, 10.5]),
        ("trace_hvps", [0, -1, 2.5]),
        ("density_probes", [0, -1]),
        ("density_steps", [0, 1.5]),
        ("hvp_method", ["magic", "", None]),
    ],
    LossLandscapeCallback: [
        ("steps", [0, 1, 4, -3, 2.5]),
        ("steps_1d", [0, 2, 20, 1.5]),
        ("distance", [0, -1.0, float("inf"), float("nan"), "far"]),
        ("include_1d", ["yes", 1]),
        ("validation", ["no", 0]),
    ],
    SharpnessCallback: [
        ("rho", [0, -0.05, float("nan"), "big"]),
        ("kinds", [["sharpest"], ["worst_case_l3"], ("worst_case_l2", "worst_case_l2"), [42]]),
        ("steps", [0, -1, 2.5]),
        ("samples", [0, -2, 1.5]),
        ("eta", [-0.01, float("nan"), "x"]),
        ("generalization", ["yes", 1]),
    ],
}
CASES = [
    pytest.param(cls, arg, value, id=f"{cls.__name__}-{arg}-{value!r}")
    for cls in SPECIFIC
    for arg, values in COMMON + SPECIFIC[cls]
    for value in values
]


@pytest.mark.parametrize(("cls", "arg", "value"), CASES)
def test_callback_argument(cls, arg, value):
    kwargs = {} if arg in ("every_n_epochs", "every_n_train_steps", "max_overhead") else dict(SCHEDULE)
    kwargs[arg] = value
    with pytest.raises((ValueError, TypeError), match=f"`{arg}`"):
        cls(**kwargs)


@pytest.mark.parametrize("cls", list(SPECIFIC))
@pytest.mark.parametrize(
    "schedule",
    [
        {"every_n_epochs": 1, "every_n_train_steps": 5},
        {"every_n_epochs": 1, "max_overhead": 0.1},
        {"every_n_train_steps": 5, "max_overhead": 0.1},
    ],
)
def test_at_most_one_schedule(cls, schedule):
    with pytest.raises(ValueError, match="every_n_train_steps") as err:
        cls(**schedule)
    assert "every_n_epochs" in str(err.value)
    assert ("max_overhead" in schedule) == ("max_overhead" in str(err.value))


@pytest.mark.parametrize("cls", list(SPECIFIC))
def test_no_schedule_is_the_wall_time_budget(cls):
    assert cls().budgeted and cls(max_overhead=0.2).max_overhead == 0.2
    assert not cls(every_n_epochs=1).budgeted


def test_sharpness_needs_something_to_measure():
    with pytest.raises(ValueError, match="kinds"):
        SharpnessCallback(every_n_epochs=1, kinds=[], generalization=False)


class _SAMModule(SAMMixin, DigitsModule):
    pass


SAM_CASES = [
    ("sam", ["yes", 1, None]),
    ("sam_rho", [0, -0.1, float("inf"), "big"]),
    ("sam_adaptive", ["yes", 0]),
    ("sam_eta", [-1.0, float("nan"), "x"]),
    ("sam_sync_first", ["no", 1]),
]


@pytest.mark.parametrize(
    ("arg", "value"), [pytest.param(a, v, id=f"{a}-{v!r}") for a, values in SAM_CASES for v in values]
)
def test_sam_argument(arg, value):
    with pytest.raises((ValueError, TypeError), match=f"`{arg}`"):
        _SAMModule(**{arg: value})


class _ManualModule(DigitsModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


@pytest.mark.parametrize("cls", list(SPECIFIC))
def test_manual_optimization_needs_loss_fn_at_setup(tmp_path, cls):
    train, _ = loaders(n_train=64, batch_size=32)
    with pytest.raises(ValueError, match="loss_fn"):
        trainer(tmp_path, [cls(every_n_epochs=1)], max_steps=1, logger=False).fit(_ManualModule(), train)


def test_unsupported_strategy_refused_at_setup(tmp_path):
    class FakeFSDP(pl.strategies.SingleDeviceStrategy):
        pass

    FakeFSDP.__name__ = "FSDPStrategy"
    train, _ = loaders(n_train=64, batch_size=32)
    cb = HessianCallback(every_n_epochs=1)
    t = trainer(tmp_path, [cb], max_steps=1, logger=False, strategy=FakeFSDP(device=torch.device("cpu")))
    with pytest.raises(RuntimeError, match="FSDPStrategy"):
        t.fit(DigitsModule(), train)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("FSDPStrategy", "FSDP1 flattens"), ("DeepSpeedStrategy", "DeepSpeed partitions"), ("XLAStrategy", "XLA")],
)
def test_strategies_that_cannot_be_measured_say_why(name, reason):
    from lightning_landscape._lightning import check_strategy

    fake = type(name, (), {})()
    with pytest.raises(RuntimeError, match=f"HessianCallback does not support {name}: {reason}"):
        check_strategy("HessianCallback", fake)


def test_tensor_parallel_is_refused_and_fsdp2_accepted():
    from pytorch_lightning.strategies import ModelParallelStrategy

    from lightning_landscape._lightning import check_strategy

    with pytest.raises(RuntimeError, match=r"tensor_parallel_size=2\. Use ModelParallelStrategy\(data_parallel_size=N"):
        check_strategy("SharpnessCallback", ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    check_strategy("SharpnessCallback", ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))


def test_a_bare_tuple_spec_is_one_measure():
    # ("worst_case", "l2") is one (kind, norm) spec, not two specs named "worst_case" and "l2"
    assert SharpnessCallback(kinds=("worst_case", "l2")).tags == ["worst_case_l2"]
    assert SharpnessCallback(kinds=("average_case", "linf", True)).tags == ["average_case_linf_adaptive"]
    with pytest.raises(ValueError, match="kinds"):
        SharpnessCallback(kinds=("worst_case", "l3"))


def test_top_k_larger_than_the_parameter_count_is_refused_at_setup(tmp_path):
    class Tiny(DigitsModule):
        def __init__(self):
            super().__init__(model=torch.nn.Linear(64, 1))  # 65 parameters
            self.net.requires_grad_(True)

        def training_step(self, batch, batch_idx):
            return self(batch[0]).pow(2).mean()

    train, _ = loaders(n_train=64, batch_size=32)
    cb = HessianCallback(every_n_epochs=1, top_k=66, max_hvps=100)
    with pytest.raises(ValueError, match=r"`top_k` must be at most the number of measured parameters \(65\), got 66"):
        trainer(tmp_path, [cb], max_steps=2, logger=False).fit(Tiny(), train)
    assert cb._measured_in_fit == 0


@pytest.mark.parametrize("cls", list(SPECIFIC))
def test_probe_size_is_given_once(cls):
    with pytest.raises(ValueError, match=r"num_samples.*num_batches"):
        cls(num_samples=256, num_batches=4)
    assert cls().num_samples == 256 and cls().num_batches is None  # DEFAULT_PROBE_SAMPLES


def test_an_exact_product_method_is_refused_for_a_sharded_module(monkeypatch):
    import lightning_landscape.callbacks._base as base

    monkeypatch.setattr(base, "is_sharded", lambda module: True)  # as under ModelParallelStrategy (FSDP2)
    with pytest.raises(ValueError, match=r"`hvp_method` must be 'auto' or 'finite_difference' for a sharded"):
        HessianCallback(hvp_method="double_backward").check_model(DigitsModule())
    HessianCallback(hvp_method="finite_difference").check_model(DigitsModule())
    HessianCallback().check_model(DigitsModule())
