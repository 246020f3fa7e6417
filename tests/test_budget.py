"""The default schedule: measuring keeps within a share of the fit's wall time.

A fake clock makes the timings exact: every training step takes 1 s, every measurement ``cost`` s,
so the steps at which a callback measures follow from the rule by hand: after a measurement of cost
``c`` the next waits ``c / share`` seconds of time not spent measuring.
"""

from __future__ import annotations

import itertools
import types

import pytest
import pytorch_lightning as pl
from _lightning import DigitsModule, loaders, read_events, scalar_steps, trainer

import lightning_landscape.callbacks._base as base
from lightning_landscape import HessianCallback, LossLandscapeCallback, SharpnessCallback
from lightning_landscape.callbacks._budget import DEFAULT_MAX_OVERHEAD, OverheadBudget


class FakeClock(pl.Callback):
    """A clock that training steps and measurements advance; placed first so it ticks before others."""

    def __init__(self, step_seconds: float = 1.0) -> None:
        self.now, self.step_seconds = 0.0, step_seconds

    def perf_counter(self) -> float:
        return self.now

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.now += self.step_seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(base, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def costing(cb, clock: FakeClock, cost: float) -> list[int]:
    """Make ``cb``'s measurements take ``cost`` fake seconds (estimated right); returns the measured steps."""
    steps: list[int] = []
    measure = cb.measure

    def timed(trainer, pl_module):
        steps.append(trainer.global_step)
        clock.now += cost
        return measure(trainer, pl_module)

    cb.measure = timed
    cb._cost_estimate = cost
    return steps


def test_measures_when_the_budget_pays(tmp_path, clock):
    # share 1/8, cost 2 s, 1 s per step: each measurement waits 16 s (steps) after the last; the fit ends
    # with one more frame, of the final weights (step 100), on top of the budget
    train, _ = loaders(n_train=800, batch_size=8)  # 100 steps
    cb = HessianCallback(max_overhead=0.125)
    steps = costing(cb, clock, 2.0)
    trainer(tmp_path, [clock, cb]).fit(DigitsModule(), train)
    assert steps == [16, 32, 48, 64, 80, 96, 100]
    assert sorted(scalar_steps(read_events(tmp_path), "hessian/eigenvalue_1")) == steps
    assert cb._spent_seconds == 14.0 <= 0.125 * 100 + 2.0


def test_default_share_is_split_and_siblings_time_is_not_training_time(tmp_path, clock):
    # three callbacks share 5%: 1/60 each. Each costs 0.49 s, so each waits 29.4 s after its last: the
    # siblings' measuring time does not count as training time (else they would measure at 30, 59, 89).
    train, _ = loaders(n_train=720, batch_size=8)  # 90 steps
    cbs = [HessianCallback(), SharpnessCallback(generalization=False), LossLandscapeCallback(validation=False)]
    steps = [costing(cb, clock, 0.49) for cb in cbs]
    trainer(tmp_path, [clock, *cbs]).fit(DigitsModule(), train)
    assert all(cb._budget.share == pytest.approx(DEFAULT_MAX_OVERHEAD / 3) for cb in cbs)
    assert steps == [[30, 60, 90]] * 3  # the last is also the end of the fit: no extra frame
    total = sum(cb._spent_seconds for cb in cbs)
    assert total == pytest.approx(9 * 0.49) and total / clock.now == pytest.approx(4.41 / 94.41)  # 4.7%


def test_explicit_schedules_do_not_share_but_are_not_training_time(tmp_path, clock):
    # the every-10-steps sibling (1 s each) costs 10% of the steps' time; that is not the budgeted one's to earn
    train, _ = loaders(n_train=800, batch_size=8)  # 100 steps
    fixed, budgeted = HessianCallback(every_n_train_steps=10), HessianCallback(max_overhead=0.125, seed=1)
    costing(fixed, clock, 1.0)
    steps = costing(budgeted, clock, 2.0)
    trainer(tmp_path, [clock, fixed, budgeted]).fit(DigitsModule(), train)
    assert budgeted._budget.share == 0.125
    assert steps == [16, 32, 48, 64, 80, 96, 100]


def test_first_measurement_waits_for_the_estimate(tmp_path, clock, monkeypatch):
    # no estimate given: one probe gradient (0.25 fake s) times the callback's work, which is paid first
    train, _ = loaders(n_train=800, batch_size=8)
    cb = HessianCallback(max_overhead=0.25)
    steps = costing(cb, clock, 2.0)
    cb._cost_estimate = None
    gradient = base.LossOperator.gradient

    def slow_gradient(op, *args, **kwargs):
        clock.now += 0.25
        return gradient(op, *args, **kwargs)

    monkeypatch.setattr(base.LossOperator, "gradient", slow_gradient)
    trainer(tmp_path, [clock, cb], max_steps=40).fit(DigitsModule(), train)
    # top-1: 9 products, 1 for the probe's standard error, 4 for the first measurement's product check, 2 gradients each
    assert cb._cost_estimate == 0.25 * 2 * 14
    # the measurement (estimated 7 s) waits 7 / 0.25 = 28 s of steps; the gradient's 0.25 s do not count
    assert steps[0] == 28


def test_budget_keeps_to_its_share_with_uneven_steps_and_costs():
    # uneven step times and costs: spending stays within one cost of its share, and does use it
    budget = OverheadBudget(share=0.05)
    budget.start(now=0.0, step=0)
    now, measured_at = 0.0, []
    for step in range(1, 3001):
        now += 0.01 + 0.005 * (step % 7)
        if budget.due(step):
            if budget.should_measure(now, others=0.0, estimate=0.3):
                cost = 0.2 + 0.1 * (step % 3)
                now += cost
                budget.measured(now, 0.0, cost)
                measured_at.append(step)
            budget.plan(now, step, others=0.0, estimate=0.3)
        assert budget.spent <= 0.05 * budget.other_time(now, 0.0) + 0.4
    assert budget.spent > 0.8 * 0.05 * budget.other_time(now, 0.0)
    gaps = [b - a for a, b in itertools.pairwise(measured_at)]
    assert min(gaps) >= 100  # evenly spread: a 0.2 s measurement waits 4 s, at most 0.04 s a step


def test_last_cost_survives_a_checkpoint(tmp_path, clock):
    train, _ = loaders(n_train=320, batch_size=8)  # 40 steps
    cb = HessianCallback(max_overhead=0.125)
    costing(cb, clock, 2.0)
    trainer(tmp_path, [clock, cb]).fit(DigitsModule(), train)
    before = HessianCallback(max_overhead=0.125)  # loaded, then set up
    before.load_state_dict(cb.state_dict())
    before.setup(trainer(tmp_path, [before]), DigitsModule(), "fit")
    after = HessianCallback(max_overhead=0.125)  # set up, then loaded: the order of a Lightning resume
    after.setup(trainer(tmp_path, [after]), DigitsModule(), "fit")
    after.load_state_dict(cb.state_dict())
    assert before._budget.last_cost == after._budget.last_cost == 2.0


DDP_BODY = """
import os, time, types
import pytorch_lightning as pl
import lightning_landscape.callbacks._base as base
from _lightning import DigitsModule, loaders
from _models import cross_entropy
from lightning_landscape import HessianCallback, LossLandscapeCallback, SharpnessCallback

if int(os.environ.get("LOCAL_RANK", 0)) == 1:  # rank 1's clock runs 20x fast: alone it would measure far more
    base.time = types.SimpleNamespace(perf_counter=lambda: 20 * time.perf_counter())
train, val = loaders(n_train=512, batch_size=8, shuffle=True)


class SlowSteps(pl.Callback):  # 50 ms a step, so that a short run earns a few measurements
    def on_train_batch_end(self, *args):
        time.sleep(0.05)


cbs = [HessianCallback(max_overhead=1.0, loss_fn=cross_entropy), SharpnessCallback(max_overhead=1.0, steps=5),
       LossLandscapeCallback(max_overhead=1.0, steps=5)]
steps = {type(cb).__name__: [] for cb in cbs}
for cb in cbs:
    def wrap(measure, name=type(cb).__name__):
        def measured(trainer, pl_module):
            steps[name].append(trainer.global_step)
            return measure(trainer, pl_module)
        return measured
    cb.measure = wrap(cb.measure)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=40, default_root_dir=OUT,
                     callbacks=[SlowSteps(), *cbs],
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.fit(DigitsModule(), train, val)
report({"steps": steps, "weights": [p.detach().sum().item() for p in trainer.lightning_module.parameters()]})
"""


@pytest.mark.slow
def test_ddp_ranks_measure_at_the_same_steps(tmp_path):
    from _ddp import run_ddp

    r0, r1 = run_ddp(tmp_path, DDP_BODY)
    assert r0["steps"] == r1["steps"]
    assert all(len(s) >= 2 for s in r0["steps"].values()), r0["steps"]
    assert r0["weights"] == r1["weights"]


def test_state_key_is_built_once_and_again_after_a_field_changes():
    # Lightning reads state_key at every hook call; it must not cost a string build each time
    cb = HessianCallback(every_n_train_steps=5)
    key = cb.state_key
    assert cb.state_key is key
    cb.top_k = 3
    assert cb.state_key != key and "'top_k': 3" in cb.state_key


def test_first_frame_within_a_minute_or_the_first_epoch_and_one_at_the_end(tmp_path, clock):
    # a 5 s measurement at 2% would first wait 250 s: the first frame comes after 60 s of training instead
    train, _ = loaders(n_train=1600, batch_size=8)  # 200 steps of 1 s: 200 s
    cb = HessianCallback(max_overhead=0.02)
    steps = costing(cb, clock, 5.0)
    trainer(tmp_path, [clock, cb]).fit(DigitsModule(), train)
    assert steps[0] == 60 and steps[-1] == 200  # then the budget waits 250 s: only the end of the fit
    assert steps == [60, 200]


def test_first_frame_at_the_end_of_the_first_epoch_when_that_comes_first(tmp_path, clock):
    train, _ = loaders(n_train=160, batch_size=8)  # 20 steps an epoch, 3 epochs
    cb = HessianCallback(max_overhead=0.02)
    steps = costing(cb, clock, 5.0)
    trainer(tmp_path, [clock, cb], max_epochs=3).fit(DigitsModule(), train)
    assert steps == [20, 60]  # end of epoch 1, then the end of the fit (the budget would wait 250 s)


def test_validate_and_test_measure_once_after_the_fact(tmp_path):
    _, val = loaders(n_train=64, n_val=64, batch_size=32)
    cb = HessianCallback(top_k=2, num_batches=2)
    t = trainer(tmp_path, [cb], max_epochs=1)

    class Tested(DigitsModule):
        def test_step(self, batch, batch_idx):
            return self.validation_step(batch, batch_idx)

    model = Tested()
    t.validate(model, val)
    assert set(cb.last_metrics) >= {"hessian/eigenvalue_1", "hessian/eigenvalue_2"}
    first = dict(cb.last_metrics)
    cb.last_metrics = {}
    t.test(model, val)
    assert cb.last_metrics["hessian/eigenvalue_1"] == pytest.approx(first["hessian/eigenvalue_1"], rel=2e-3)
