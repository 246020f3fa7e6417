"""SAMMixin through a real Trainer, against SAM/ASAM written out by hand in plain torch (float64)."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import pytorch_lightning as pl
import torch
from _lightning import DigitsModule, loaders, trainer
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_landscape.sam import SAMMixin

LR, RHO = 0.1, 0.05


class _CallCount:
    """Counts training_step calls where the second pass's guard does not reach (an object, not a plain attribute)."""

    def __init__(self) -> None:
        self.n = 0


class SAMDigits(SAMMixin, DigitsModule):
    """The tests' digits MLP with SAM mixed in; counts its training_step calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counter = _CallCount()
        self.plain_calls = 0  # a plain attribute: the second pass leaves it as the first pass made it

    @property
    def calls(self) -> int:
        return self.counter.n

    def training_step(self, batch, batch_idx):
        self.counter.n += 1
        self.plain_calls += 1
        return super().training_step(batch, batch_idx)


def train_batches(steps: int, batch_size: int = 64) -> list:
    train, _ = loaders(n_train=steps * batch_size, batch_size=batch_size, shuffle=False)
    return list(train)


def fit(module: pl.LightningModule, tmp_path, steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    """``steps`` optimizer steps over the unshuffled digits batches (4 per epoch)."""
    kwargs.setdefault("logger", False)
    kwargs.setdefault("max_epochs", -1)
    t = trainer(tmp_path, list(callbacks), max_steps=steps, **kwargs)
    train, _ = loaders(shuffle=False)
    t.fit(module, train)
    return t


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)


def reference(model, batches, lrs, rho=RHO, adaptive=False, eta=0.01, clip=None, autocast=None):
    """SAM/ASAM steps written out: g at w, ε, g_sam at w + ε, optional norm clipping of g_sam, SGD.

    float64 unless ``autocast`` (a dtype) is given: then float32 weights and a CPU autocast forward, as Lightning's
    mixed precision does.
    """
    model = copy.deepcopy(model)
    if autocast is None:
        model = model.double()
    params = list(model.parameters())
    ctx = (lambda: torch.autocast("cpu", dtype=autocast, cache_enabled=False)) if autocast else torch.enable_grad
    for batch, lr in zip(batches, lrs, strict=True):
        with ctx():
            g = torch.autograd.grad(loss_of(model, batch), params)
        with torch.no_grad():
            t = [p.abs() + eta if adaptive else torch.ones_like(p) for p in params]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
            eps = [rho * ti * ti * gi / norm for ti, gi in zip(t, g, strict=True)]
            w = [p.clone() for p in params]
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
        with ctx():
            gs = torch.autograd.grad(loss_of(model, batch), params)
        with torch.no_grad():
            for p, wi in zip(params, w, strict=True):
                p.copy_(wi)
            if clip is not None:
                total = torch.sqrt(sum((gi**2).sum() for gi in gs))
                gs = [gi * torch.clamp(clip / (total + 1e-6), max=1.0) for gi in gs]
            for p, gi in zip(params, gs, strict=True):
                p.sub_(lr * gi)
    return [p.detach() for p in params]


def max_diff(a, b) -> float:
    return max((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(a, b, strict=True))


class Record(Callback):
    """Weights and lr at each batch start; step outputs at each batch end."""

    def __init__(self):
        self.weights, self.lrs, self.outputs = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(copy.deepcopy(pl_module.net))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs["loss"].item())


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "record"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]


# ------------------------------------------------------------------------------------------ the update
@pytest.mark.parametrize(("adaptive", "rho"), [(False, 0.05), (True, 0.5)])
def test_steps_match_hand_written_sam_and_asam(tmp_path, adaptive, rho):
    module = SAMDigits(lr=LR, sam=True, sam_rho=rho, sam_adaptive=adaptive)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=2)
    expected = reference(start, train_batches(2), [LR, LR], rho=rho, adaptive=adaptive)
    assert max_diff(module.net.parameters(), expected) < 1e-6
    assert module.calls == 4  # two forward-backward passes per step
    assert module.plain_calls == 2  # and a plain counter counts steps: the second pass leaves no trace
    # the perturbation matters: plain SGD (rho -> 0) ends far from there
    plain = reference(start, train_batches(2), [LR, LR], rho=1e-12)
    assert max_diff(plain, expected) > 1e-4


def test_flag_off_is_bitwise_plain_training(tmp_path):
    runs = []
    for module in (SAMDigits(lr=LR, momentum=0.9, sam=False), DigitsModule(lr=LR, momentum=0.9)):
        torch.manual_seed(3)  # the shuffling sampler draws from the global generator
        t = trainer(tmp_path, [], max_epochs=2, logger=False)
        t.fit(module, loaders(shuffle=True)[0])
        runs.append([p.detach().clone() for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_sam_can_be_switched_on_during_training(tmp_path):
    class Late(SAMDigits):
        def on_train_batch_start(self, batch, batch_idx):
            self.sam = self.global_step >= 1

    module = Late(lr=LR)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=2)
    after_sgd = reference(start, train_batches(1), [LR], rho=1e-12)
    net = copy.deepcopy(start)
    for p, w in zip(net.parameters(), after_sgd, strict=True):
        p.data.copy_(w)
    expected = reference(net, train_batches(2)[1:], [LR])
    assert max_diff(module.net.parameters(), expected) < 1e-6
    assert module.calls == 3


# ------------------------------------------------------------------------------------------ precision
def test_bf16_mixed_matches_autocast_reference(tmp_path):
    module = SAMDigits(lr=LR, sam=True)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=2, precision="bf16-mixed")
    assert all(p.dtype == torch.float32 for p in module.parameters())
    expected = reference(start, train_batches(2), [LR, LR], autocast=torch.bfloat16)
    plain = reference(start, train_batches(2), [LR, LR], rho=1e-12, autocast=torch.bfloat16)
    # same autocast ops as the reference (measured 1e-9 apart); bf16 itself moves the result 4e-5 from float64
    assert max_diff(module.net.parameters(), expected) < 1e-6
    assert max_diff(plain, expected) > 5e-4


def test_double_precision_matches_float64_reference(tmp_path):
    module = SAMDigits(lr=LR, sam=True, sam_adaptive=True, sam_rho=0.5)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=2, precision="64-true")
    expected = reference(start, train_batches(2), [LR, LR], rho=0.5, adaptive=True)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    diff = max((p - e).abs().max().item() for p, e in zip(module.net.parameters(), expected, strict=True))
    assert diff < 1e-10  # float64 all the way (measured 2e-11); float32 storage alone would round by ~1e-9


def fp16_plugin(init_scale: float) -> MixedPrecision:
    """16-mixed on the CPU (Lightning maps precision='16-mixed' to bf16 there, so build the plugin)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


@pytest.mark.parametrize("init_scale", [1.0, 2.0**14])
def test_fp16_loss_scale_does_not_change_the_step(tmp_path, init_scale):
    module = SAMDigits(lr=LR, sam=True)
    start = copy.deepcopy(module.net)
    plugin = fp16_plugin(init_scale)
    fit(module, tmp_path, steps=2, plugins=[plugin])
    assert plugin.scaler.get_scale() == init_scale  # no step skipped
    expected = reference(start, train_batches(2), [LR, LR], autocast=torch.float16)
    plain = reference(start, train_batches(2), [LR, LR], rho=1e-12, autocast=torch.float16)
    # float16 gradients of the scaled loss round differently from the unscaled reference's (measured 4e-7)
    assert max_diff(module.net.parameters(), expected) < 1e-5
    assert max_diff(plain, expected) > 5e-4


def test_fp16_non_finite_first_gradient_skips_the_step(tmp_path):
    """A gradient that overflows in the first pass only must skip the step, as GradScaler would skip it."""

    class Overflow(SAMDigits):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.extra = nn.Parameter(torch.ones(()))

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if batch_idx == 0 and not self.sam_perturbed:  # only in the first pass of the first step
                loss = loss + self.extra * float("inf")
            return loss

    results = {}
    for sam in (False, True):
        module = Overflow(lr=LR, sam=sam)
        start = copy.deepcopy(module.net)
        plugin = fp16_plugin(2.0**10)
        fit(module, tmp_path, steps=2, plugins=[plugin])
        results[sam] = plugin.scaler.get_scale()
        assert torch.isfinite(torch.cat([p.detach().flatten() for p in module.parameters()])).all()
        if sam:  # step 0 skipped: the net made exactly one SAM step, from the second batch
            expected = reference(start, train_batches(2)[1:], [LR], autocast=torch.float16)
            assert max_diff(module.net.parameters(), expected) < 1e-5
    assert results[True] == results[False] == 2.0**9  # backed off once, as without SAM


# ------------------------------------------------------------------------------------------ Trainer features
def test_gradient_clipping_clips_g_sam(tmp_path):
    clip = 0.05
    seen = []

    class Spy(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(torch.sqrt(sum((p.grad**2).sum() for p in pl_module.parameters())).item())

    module = SAMDigits(lr=LR, sam=True)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=2, callbacks=[Spy()], gradient_clip_val=clip)
    assert min(seen) > 2 * clip  # clipping is active
    expected = reference(start, train_batches(2), [LR, LR], clip=clip)
    unclipped = reference(start, train_batches(2), [LR, LR])
    assert max_diff(module.net.parameters(), expected) < 1e-6
    assert max_diff(unclipped, expected) > 1e-3


class Scheduled(SAMDigits):
    def __init__(self, interval: str = "step", frequency: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.interval, self.frequency = interval, frequency

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": self.interval, "frequency": self.frequency},
        }


@pytest.mark.parametrize(
    ("interval", "frequency", "lrs"), [("step", 2, [0.1, 0.1, 0.05, 0.05]), ("epoch", 1, [0.1] * 4 + [0.05] * 4)]
)
def test_lr_scheduler_steps_as_without_sam(tmp_path, interval, frequency, lrs):
    steps = len(lrs)
    records = {}
    for sam in (False, True):
        rec = Record()
        module = Scheduled(interval=interval, frequency=frequency, lr=LR, sam=sam)
        start = copy.deepcopy(module.net)
        fit(module, tmp_path, steps=steps, callbacks=[rec])
        records[sam] = rec.lrs
    assert records[True] == records[False] == lrs
    batches = train_batches(4) * (steps // 4)  # 4 batches per epoch, unshuffled
    expected = reference(start, batches, lrs)
    assert max_diff(module.net.parameters(), expected) < 1e-6


def test_batchnorm_statistics_move_once_per_step(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10))
    module = SAMDigits(lr=LR, sam=True, model=net)
    rec = Record()
    steps = 3
    fit(module, tmp_path, steps=steps, callbacks=[rec])
    bn = module.net[1]
    assert bn.num_batches_tracked.item() == steps
    mean, var = torch.zeros(16), torch.ones(16)
    for w, (x, _) in zip(rec.weights, train_batches(steps), strict=True):  # one forward at w per step
        h = w[0](x).detach()
        mean = 0.9 * mean + 0.1 * h.mean(0)
        var = 0.9 * var + 0.1 * h.var(0, unbiased=True)
    assert (bn.running_mean - mean).abs().max().item() < 1e-6
    assert (bn.running_var - var).abs().max().item() < 1e-6


class Logged(SAMDigits):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.updates = []

    def training_step(self, batch, batch_idx):
        self.counter.n += 1
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.acc(logits.argmax(-1), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", self.acc, on_step=True, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.updates.append(self.acc.update_count)


def test_logging_reports_first_pass_once_per_step(tmp_path):
    logger, rec = RecordingLogger(), Record()
    module = Logged(lr=LR, sam=True)
    steps = 4
    fit(module, tmp_path, steps=steps, callbacks=[rec], logger=logger, log_every_n_steps=1, max_epochs=1)
    assert module.calls == 2 * steps
    batches = train_batches(steps)
    with torch.no_grad():
        losses = [loss_of(w, b).item() for w, b in zip(rec.weights, batches, strict=True)]
        correct = [(w(b[0]).argmax(-1) == b[1]).float() for w, b in zip(rec.weights, batches, strict=True)]
    assert logger.values("train_loss_step") == pytest.approx(losses, abs=1e-6)
    assert rec.outputs == pytest.approx(losses, abs=1e-6)  # the step output is L(w) too
    assert logger.values("train_loss_epoch") == pytest.approx([sum(losses) / steps], abs=1e-6)
    assert logger.values("train_acc_step") == pytest.approx([c.mean().item() for c in correct], abs=1e-6)
    assert logger.values("train_acc_epoch") == pytest.approx([torch.cat(correct).mean().item()], abs=1e-6)
    assert module.updates == [1, 2, 3, 4]  # the metric saw one update per step


def test_checkpoints_hold_unperturbed_weights(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    module = SAMDigits(lr=LR, sam=True)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=3, callbacks=[ckpt], enable_checkpointing=True)
    for step in (1, 2, 3):
        state = torch.load(tmp_path / "ckpt" / f"epoch=0-step={step}.ckpt", weights_only=False)["state_dict"]
        expected = reference(start, train_batches(step), [LR] * step)
        saved = [state[f"net.{n}"] for n, _ in start.named_parameters()]
        assert max_diff(saved, expected) < 1e-6


def test_checkpoint_saved_during_the_second_pass_holds_w(tmp_path):
    class SaveInSecondPass(Callback):
        def on_after_backward(self, trainer, pl_module):
            if pl_module.sam_perturbed and trainer.global_step == 1:
                trainer.save_checkpoint(tmp_path / "second_pass.ckpt")

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10))
    module = SAMDigits(lr=LR, sam=True, model=net)
    rec = Record()
    fit(module, tmp_path, steps=2, callbacks=[SaveInSecondPass(), rec])
    state = torch.load(tmp_path / "second_pass.ckpt", weights_only=False)["state_dict"]
    w1 = rec.weights[1]  # the weights at the start of step 1
    assert all(torch.equal(state[f"net.{n}"], p) for n, p in w1.named_parameters())
    # BatchNorm statistics as after step 1's first pass: one more update from w1's batch
    x, _ = train_batches(2)[1]
    h = w1[0](x).detach()
    assert (state["net.1.running_mean"] - (0.9 * w1[1].running_mean + 0.1 * h.mean(0))).abs().max() < 1e-6
    assert state["net.1.num_batches_tracked"].item() == 2
    assert module.state_dict()["net.0.weight"].data_ptr() == module.net[0].weight.data_ptr()  # back to normal


def test_weights_restored_when_the_second_pass_raises(tmp_path):
    class Failing(SAMDigits):
        def training_step(self, batch, batch_idx):
            if self.sam_perturbed and batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = Failing(lr=LR, sam=True)
    start = copy.deepcopy(module.net)
    with pytest.raises(RuntimeError, match="boom"):
        fit(module, tmp_path, steps=3)
    expected = reference(start, train_batches(1), [LR])  # after step 0, not w + ε of step 1
    assert max_diff(module.net.parameters(), expected) < 1e-6
    assert not module.sam_perturbed
    assert "log" not in module.__dict__


def test_max_steps_early_stopping_and_global_step(tmp_path):
    for sam in (False, True):
        module = SAMDigits(lr=LR, sam=sam)
        t = fit(module, tmp_path, steps=3)
        assert t.global_step == 3
        assert module.calls == 3 * (2 if sam else 1)
        stop = EarlyStopping(monitor="train_loss", stopping_threshold=100.0, check_on_train_epoch_end=True)
        module = SAMDigits(lr=LR, sam=sam)
        t = fit(module, tmp_path, steps=-1, callbacks=[stop], max_epochs=5)
        assert (t.current_epoch, t.global_step) == (1, 4)


def test_training_step_returning_none_skips_the_step(tmp_path):
    class Skipping(SAMDigits):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 0 else super().training_step(batch, batch_idx)

    module = Skipping(lr=LR, sam=True)
    start = copy.deepcopy(module.net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(module, tmp_path, steps=2)
    expected = reference(start, train_batches(2)[1:], [LR])
    assert max_diff(module.net.parameters(), expected) < 1e-6


# ------------------------------------------------------------------------------------------ configuration
def test_manual_optimization_is_refused_at_setup(tmp_path):
    class Manual(SAMDigits):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.automatic_optimization = False

    module = Manual(lr=LR, sam=True)
    with pytest.raises(ValueError, match="automatic optimization"):
        fit(module, tmp_path, steps=1)
    assert module.calls == 0


def test_unsupported_strategies_are_refused():
    from pytorch_lightning.strategies import FSDPStrategy

    module = SAMDigits(sam=True)
    fake = types.SimpleNamespace(strategy=FSDPStrategy(), accumulate_grad_batches=1, optimizers=[])
    with pytest.raises(ValueError, match="FSDPStrategy"):
        module._sam_check(fake)
    from pytorch_lightning.strategies import ModelParallelStrategy

    tensor_parallel = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    fake = types.SimpleNamespace(strategy=tensor_parallel, accumulate_grad_batches=1, optimizers=[])
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        module._sam_check(fake)


def test_overriding_optimizer_step_warns(tmp_path):
    class Own(SAMDigits):
        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)

    with pytest.warns(UserWarning, match="overrides `optimizer_step`"):
        fit(Own(lr=LR, sam=True), tmp_path, steps=1)


def test_mixin_must_come_first():
    with pytest.raises(TypeError):
        type("Wrong", (pl.LightningModule, SAMMixin), {})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sam": 1}, TypeError, "`sam` must be True or False"),
        ({"sam_rho": 0.0}, ValueError, "`sam_rho` must be a finite number > 0"),
        ({"sam_rho": float("nan")}, ValueError, "`sam_rho`"),
        ({"sam_rho": "0.1"}, ValueError, "`sam_rho`"),
        ({"sam_adaptive": "yes"}, TypeError, "`sam_adaptive`"),
        ({"sam_eta": -0.1}, ValueError, "`sam_eta` must be a finite number >= 0"),
        ({"sam_sync_first": None}, TypeError, "`sam_sync_first`"),
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAMDigits(**kwargs)
    module = SAMDigits()
    with pytest.raises(error, match=match):
        setattr(module, *next(iter(kwargs.items())))


def test_settings_through_lightning_cli(tmp_path):
    pytest.importorskip("jsonargparse")
    from pytorch_lightning.cli import LightningCLI

    class CLIModel(SAMMixin, pl.LightningModule):
        def __init__(self, hidden: int = 8, **kwargs):
            super().__init__(**kwargs)
            self.net = nn.Linear(4, hidden)

    config = tmp_path / "config.yaml"
    config.write_text("model:\n  sam: true\n  sam_rho: 0.2\n  sam_eta: 0.02\n")
    common = ["--trainer.accelerator=cpu", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    cli = LightningCLI(
        CLIModel,
        run=False,
        save_config_callback=None,
        args=[f"--config={config}", "--model.sam_adaptive=true", *common],
    )
    m = cli.model
    assert (m.sam, m.sam_rho, m.sam_adaptive, m.sam_eta, m.sam_sync_first) == (True, 0.2, True, 0.02, False)
    # a module with its own constructor arguments, passing the rest on
    cli = LightningCLI(
        SAMDigits, run=False, save_config_callback=None, args=["--model.lr=0.3", "--model.sam=true", *common]
    )
    assert (cli.model.lr, cli.model.sam, cli.model.sam_rho) == (0.3, True, 0.05)


def _aten_calls(fn) -> int:
    """How many ATen operators ``fn()`` dispatches that compute (on a GPU, about how many kernels it
    launches): detaching and allocating launch none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func not in (torch.ops.aten.detach.default, torch.ops.aten.empty_like.default):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


@pytest.mark.parametrize("adaptive", [False, True])
def test_ascent_step_launches_a_fixed_number_of_kernels(adaptive):
    # SAM's step on a GPU is launch-bound for small models: the ascent must not cost one kernel per parameter.
    from lightning_landscape.functional._perturbation import ascent_step

    def calls(n: int) -> int:
        grads = [torch.randn(3, 2) for _ in range(n)]
        weights = [torch.randn(3, 2) for _ in range(n)]
        return _aten_calls(lambda: ascent_step(grads, weights if adaptive else None, 0.1, adaptive=adaptive))

    assert calls(40) == calls(4)


def test_ascent_step_keeps_each_tensors_dtype():
    from lightning_landscape.functional._perturbation import ascent_step

    g = [torch.tensor([3.0]), torch.tensor([4.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.bfloat16)]
    eps = ascent_step(g, None, rho=0.5)
    assert [e.dtype for e in eps] == [torch.float32, torch.float64, torch.bfloat16]
    assert [float(e) for e in eps] == pytest.approx([0.3, 0.4, 0.0], rel=1e-6)
    assert all(e.data_ptr() != t.data_ptr() for e, t in zip(eps, g, strict=True))  # new tensors
