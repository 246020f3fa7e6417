"""SAMMixin's variants (issue 17) through a real Trainer, against the same steps written out in plain torch (float64):
SAM on every k-th step, a subset of parameters perturbed (SAM-ON), ρ schedules, logging, LookSAM's reuse."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _lightning import loaders, trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from test_sam import LR, RHO, Record, RecordingLogger, SAMDigits, fit, loss_of, max_diff, train_batches
from torch import nn

from lightning_landscape._sam_variants import ParamSelection, is_sam_step
from lightning_landscape.sam import SAMMixin


def bn_net() -> nn.Module:
    """An MLP with BatchNorm (no bias before it: its gradient would be rounding noise, which Adam blows up to ±lr)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10))


def reference(
    model: nn.Module,
    batches: list,
    *,
    optimizer: str = "sgd",
    lr: float = LR,
    momentum: float = 0.0,
    rho=RHO,
    every: int = 1,
    perturb: set[str] | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
    alpha: float | None = None,
) -> list[torch.Tensor]:
    """The variants written out: on the k-th, 2k-th, … step (``every``) SAM with ε over the parameters named in
    ``perturb`` (all if ``None``) and ρ = ``rho`` or ``rho(step)``; otherwise a plain step, plus LookSAM's
    ``α·‖g‖/‖g_v‖·g_v`` when ``alpha`` is given. Every parameter steps with the gradient at w + ε."""
    model = copy.deepcopy(model).double()
    named = list(model.named_parameters())
    params = [p for _, p in named]
    chosen = [perturb is None or n in perturb for n, _ in named]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    g_v = None
    for step, batch in enumerate(batches):
        g = torch.autograd.grad(loss_of(model, batch), params)
        if (step + 1) % every == 0:
            r = rho(step) if callable(rho) else rho
            with torch.no_grad():
                sel = [i for i, c in enumerate(chosen) if c]
                t = {i: params[i].abs() + eta if adaptive else torch.ones_like(params[i]) for i in sel}
                norm = torch.sqrt(sum(((t[i] * g[i]) ** 2).sum() for i in sel))
                w = [p.clone() for p in params]
                for i in sel:
                    params[i].add_(r * t[i] * t[i] * g[i] / norm)
            gs = torch.autograd.grad(loss_of(model, batch), params)
            with torch.no_grad():
                for p, wi in zip(params, w, strict=True):
                    p.copy_(wi)
                g_v = looksam_component(g, gs)
            update = gs
        elif alpha is not None and g_v is not None:
            with torch.no_grad():
                update = looksam_update(g, g_v, alpha)
        else:
            update = g
        for p, u in zip(params, update, strict=True):
            p.grad = u.detach().clone()
        opt.step()
    return [p.detach() for p in params]


def looksam_component(g: list[torch.Tensor], g_sam: list[torch.Tensor]) -> list[torch.Tensor]:
    """LookSAM's ``g_v``: the part of ``g_sam`` orthogonal to ``g`` (over all tensors together)."""
    dot = sum((a * b).sum() for a, b in zip(g, g_sam, strict=True))
    gg = sum((a * a).sum() for a in g)
    return [b - dot / gg * a for a, b in zip(g, g_sam, strict=True)]


def looksam_update(g: list[torch.Tensor], g_v: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """A plain step's gradient under LookSAM: ``g + α·‖g‖/‖g_v‖·g_v``."""
    gnorm = torch.sqrt(sum((a * a).sum() for a in g))
    vnorm = torch.sqrt(sum((v * v).sum() for v in g_v))
    return [a + alpha * gnorm / vnorm * v for a, v in zip(g, g_v, strict=True)]


def fit_full_batch(module, tmp_path, steps: int, callbacks=(), ckpt_path=None, **kwargs) -> None:
    """``steps`` full-batch steps (64 samples): Lightning resumes a plain ``DataLoader`` from a fresh iterator, so
    only a one-batch epoch gives the resumed run the same data as the uninterrupted one."""
    train, _ = loaders(n_train=64, batch_size=64, shuffle=False)
    t = trainer(tmp_path, list(callbacks), max_steps=steps, max_epochs=-1, logger=False, **kwargs)
    t.fit(module, train, ckpt_path=ckpt_path)


def snapshot(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ------------------------------------------------------------------------------------------ every k-th step
@pytest.mark.parametrize(("optimizer", "momentum", "lr"), [("sgd", 0.9, LR), ("adam", 0.0, 1e-3)])
def test_every_k_matches_hand_written_steps(tmp_path, optimizer, momentum, lr):
    k, steps = 3, 7  # SAM at steps 2 and 5, plain steps between
    module = SAMDigits(lr=lr, momentum=momentum, optimizer=optimizer, sam=True, sam_every_n_steps=k)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=steps)
    assert module.calls == steps + 2  # two second passes
    kw = dict(optimizer=optimizer, lr=lr, momentum=momentum)
    expected = reference(start, (train_batches(4) * 2)[:steps], every=k, **kw)
    assert max_diff(module.net.parameters(), expected) < 1e-6
    plain = reference(start, (train_batches(4) * 2)[:steps], every=10**6, **kw)
    every_step = reference(start, (train_batches(4) * 2)[:steps], every=1, **kw)
    assert min(max_diff(plain, expected), max_diff(every_step, expected)) > 1e-5  # neither plain nor all-SAM


def test_schedule_counts_like_lightning():
    assert [s for s in range(12) if is_sam_step(s, 5)] == [4, 9]  # the 5th and 10th step
    assert all(is_sam_step(s, 1) for s in range(5))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_k_1_and_all_parameters_are_bitwise_todays_sam(tmp_path, optimizer):
    lr = LR if optimizer == "sgd" else 1e-3
    runs = []
    for extra in (
        {},  # today's SAM
        {"sam_every_n_steps": 1},
        {"sam_params": None},
        {"sam_params": ["*"]},  # an explicit selection of everything takes the selection path
        {"sam_params": lambda name, p: True, "sam_every_n_steps": 1},
        {"sam_log": True},  # logging does not change the step
        {"sam_rho": lambda step: RHO},
    ):
        module = SAMDigits(lr=lr, momentum=0.9, optimizer=optimizer, sam=True, model=bn_net(), **extra)
        fit(module, tmp_path, steps=5)
        runs.append(snapshot(module))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run, strict=True))


# ------------------------------------------------------------------------------------------ which parameters
@pytest.mark.parametrize(
    ("spec", "perturb", "adaptive", "optimizer"),
    [
        ("norm", {"1.weight", "1.bias"}, False, "sgd"),  # SAM-ON
        ("norm", {"1.weight", "1.bias"}, True, "adam"),  # ASAM's scaling over the norm layer only
        (["net.0.*", "net.3.bias"], {"0.weight", "3.bias"}, False, "sgd"),
        (lambda name, p: p.dim() == 2, {"0.weight", "3.weight"}, False, "adam"),
    ],
)
def test_sam_params_match_hand_written_steps(tmp_path, spec, perturb, adaptive, optimizer):
    lr, rho = (LR, 0.5 if adaptive else RHO) if optimizer == "sgd" else (1e-3, 0.5 if adaptive else RHO)
    module = SAMDigits(
        lr=lr, momentum=0.9, optimizer=optimizer, sam=True, sam_params=spec, sam_adaptive=adaptive, sam_rho=rho,
        model=bn_net(),
    )  # fmt: skip
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=4)
    kw = dict(optimizer=optimizer, lr=lr, momentum=0.9, rho=rho, adaptive=adaptive)
    expected = reference(start, train_batches(4), perturb=perturb, **kw)
    assert max_diff(module.net.parameters(), expected) < 1e-6
    everything = reference(start, train_batches(4), **kw)
    assert max_diff(everything, expected) > 1e-5  # the selection matters


def test_first_pass_computes_the_perturbed_gradients_only(tmp_path):
    """The others step with the gradient at w + ε, so the first pass skips theirs (the cost SAM-ON saves)."""
    seen = []

    class Spy(Callback):
        def on_after_backward(self, trainer, pl_module):
            with_grad = sorted(n for n, p in pl_module.named_parameters() if p.grad is not None)
            seen.append((pl_module.sam_perturbed, with_grad))

    net = bn_net()
    net[3].bias.requires_grad_(False)  # frozen by the user: stays frozen
    module = SAMDigits(lr=LR, sam=True, sam_params="norm", model=net)
    fit(module, tmp_path, steps=2, callbacks=[Spy()])
    trainable = sorted(n for n, p in module.named_parameters() if n != "net.3.bias")
    assert seen == [(False, ["net.1.bias", "net.1.weight"]), (True, trainable)] * 2
    assert [n for n, p in module.named_parameters() if not p.requires_grad] == ["net.3.bias"]


def test_requires_grad_restored_when_the_first_pass_raises(tmp_path):
    class Failing(SAMDigits):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = Failing(lr=LR, sam=True, sam_params="norm", model=bn_net())
    with pytest.raises(RuntimeError, match="boom"):
        fit(module, tmp_path, steps=3)
    assert all(p.requires_grad for p in module.parameters())


def test_norm_selects_the_affine_parameters_of_normalization_layers():
    class RMSNormLike(nn.Module):  # a user's own layer, named like one
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

    RMSNormLike.__name__ = "LlamaRMSNorm"
    net = nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.InstanceNorm1d(4, affine=True),
        nn.RMSNorm(4), RMSNormLike(), nn.LayerNorm(4, elementwise_affine=False),
    )  # fmt: skip
    names = ParamSelection("norm").names(net)
    assert names == [f"{i}.{w}" for i in (1, 2, 3, 4) for w in ("weight", "bias")] + ["5.weight", "6.scale"]


def test_selection_that_selects_nothing_is_an_error_at_setup(tmp_path):
    module = SAMDigits(lr=LR, sam=True, sam_params="norm")  # the digits MLP has no normalization layer
    with pytest.raises(ValueError, match=r"`sam_params`='norm' selects none of the \d+ parameters"):
        fit(module, tmp_path, steps=1)
    assert module.calls == 0
    with pytest.warns(UserWarning, match=r"patterns \['nope\.\*'\] match no parameter"):
        fit(SAMDigits(lr=LR, sam=True, sam_params=["net.0.*", "nope.*"]), tmp_path, steps=1)


def test_selection_follows_replaced_parameters():
    net = bn_net()
    selection = ParamSelection("norm")
    params = list(net.parameters())
    assert [p.shape for p in selection.select(net, params)] == [(16,), (16,)]
    net[1].weight = nn.Parameter(torch.ones(16))  # e.g. FSDP2 replacing parameters after setup
    chosen = selection.select(net, list(net.parameters()))
    assert chosen[0] is net[1].weight and len(chosen) == 2


# ------------------------------------------------------------------------------------------ ρ schedule
def test_rho_schedule_matches_hand_written_steps(tmp_path):
    def schedule(step: int) -> float:
        return 0.02 * (step + 1)

    module = SAMDigits(lr=LR, momentum=0.9, sam=True, sam_rho=schedule, sam_every_n_steps=2)
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=6)
    batches = (train_batches(4) * 2)[:6]
    expected = reference(start, batches, momentum=0.9, rho=schedule, every=2)
    assert max_diff(module.net.parameters(), expected) < 1e-6
    constant = reference(start, batches, momentum=0.9, rho=0.02, every=2)
    assert max_diff(constant, expected) > 1e-5


def test_rho_schedule_returning_a_bad_value_raises_at_that_step(tmp_path):
    module = SAMDigits(lr=LR, sam=True, sam_rho=lambda step: 0.05 if step < 2 else 0.0)
    with pytest.raises(ValueError, match=r"`sam_rho` returned 0.0 at step 2"):
        fit(module, tmp_path, steps=4)


# ------------------------------------------------------------------------------------------ logging
class LoggedDigits(SAMDigits):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize(("adaptive", "spec"), [(False, None), (True, ["net.0.*"])])
def test_logged_sharpness_grad_norm_and_rho(tmp_path, adaptive, spec):
    k, steps, eta = 2, 6, 0.01
    rho = (lambda step: 0.1 + step / 100) if not adaptive else 0.5
    logger, rec = RecordingLogger(), Record()
    module = LoggedDigits(lr=LR, sam=True, sam_every_n_steps=k, sam_log=True, sam_rho=rho, sam_adaptive=adaptive,
                          sam_params=spec)  # fmt: skip
    fit(module, tmp_path, steps=steps, callbacks=[rec], logger=logger, log_every_n_steps=1)
    logged = {step: m for step, m in logger.metrics if "train_loss" in m}
    assert sorted(logged) == list(range(steps))  # the user's loss, once per step
    sam_steps = [s for s in range(steps) if (s + 1) % k == 0]
    assert [s for s, m in logged.items() if "sam/sharpness" in m] == sam_steps  # on SAM steps only
    assert all(("sam/grad_norm" in m) == ("sam/rho" in m) == (s in sam_steps) for s, m in logged.items())
    batches = (train_batches(4) * 2)[:steps]  # 4 batches per epoch
    for s in sam_steps:  # recomputed by hand from the weights at the start of that step
        net = copy.deepcopy(rec.weights[s]).double()
        named = [(n, p) for n, p in net.named_parameters() if spec is None or n.startswith("0.")]
        r = rho(s) if callable(rho) else rho
        loss = loss_of(net, batches[s])
        g = torch.autograd.grad(loss, [p for _, p in named])
        with torch.no_grad():
            t = [p.abs() + eta if adaptive else torch.ones_like(p) for _, p in named]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
            for (_, p), ti, gi in zip(named, t, g, strict=True):
                p.add_(r * ti * ti * gi / norm)
            perturbed = loss_of(net, batches[s])
        assert logged[s]["train_loss"] == pytest.approx(loss.item(), abs=1e-6)  # L(w): the guard held
        assert logged[s]["sam/sharpness"] == pytest.approx((perturbed - loss).item(), abs=1e-6)
        assert logged[s]["sam/grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
        assert logged[s]["sam/rho"] == pytest.approx(r, rel=1e-6)
        assert logged[s]["sam/sharpness"] > 0  # the ascent ascends


def test_no_logging_outside_a_trainer_and_when_off(tmp_path):
    logger = RecordingLogger()
    fit(LoggedDigits(lr=LR, sam=True), tmp_path, steps=2, logger=logger, log_every_n_steps=1)
    assert not any(k.startswith("sam/") for _, m in logger.metrics for k in m)


# ------------------------------------------------------------------------------------------ LookSAM
@pytest.mark.parametrize(("optimizer", "momentum", "lr"), [("sgd", 0.9, LR), ("adam", 0.0, 1e-3)])
def test_reuse_matches_hand_written_looksam(tmp_path, optimizer, momentum, lr):
    k, steps, alpha = 3, 8, 0.7
    module = SAMDigits(lr=lr, momentum=momentum, optimizer=optimizer, sam=True, sam_every_n_steps=k,
                       sam_reuse=True, sam_reuse_alpha=alpha)  # fmt: skip
    start = copy.deepcopy(module.net)
    fit(module, tmp_path, steps=steps)
    batches = (train_batches(4) * 2)[:steps]
    kw = dict(optimizer=optimizer, lr=lr, momentum=momentum, every=k)
    expected = reference(start, batches, alpha=alpha, **kw)
    assert max_diff(module.net.parameters(), expected) < 1e-6
    assert max_diff(reference(start, batches, **kw), expected) > 1e-5  # the reuse matters


def test_reuse_without_plain_steps_is_sam(tmp_path):
    runs = []
    for reuse in (False, True):
        module = SAMDigits(lr=LR, momentum=0.9, sam=True, sam_reuse=reuse)
        fit(module, tmp_path, steps=3)
        runs.append(snapshot(module))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("reuse", [False, True])
def test_resume_between_sam_steps_is_exact(tmp_path, reuse):
    k, steps = 3, 10  # SAM at steps 2, 5, 8; the checkpoint after 4 steps is between SAM steps

    def module():
        return SAMDigits(lr=LR, momentum=0.9, sam=True, sam_every_n_steps=k, sam_reuse=reuse, model=bn_net())

    whole = module()
    fit_full_batch(whole, tmp_path / "whole", steps)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4)
    fit_full_batch(module(), tmp_path / "first", 6, callbacks=[ckpt], enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=3-step=4.ckpt"
    saved = torch.load(path, weights_only=False)
    assert ("SAMMixin" in saved) == reuse
    resumed = module()
    fit_full_batch(resumed, tmp_path / "resumed", steps, ckpt_path=path)
    assert resumed.global_step == steps
    assert resumed.calls == (steps - 4) + 2  # steps 5 and 8 were SAM steps
    assert all(torch.equal(a, b) for a, b in zip(snapshot(whole), snapshot(resumed), strict=True))
    if reuse:  # without the saved g_v the resumed run differs: the state is what makes it exact
        del saved["SAMMixin"]
        torch.save(saved, tmp_path / "stripped.ckpt")
        stripped = module()
        fit_full_batch(stripped, tmp_path / "stripped", steps, ckpt_path=tmp_path / "stripped.ckpt")
        assert max_diff(snapshot(whole), snapshot(stripped)) > 1e-6


# ------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sam_every_n_steps": 0}, "`sam_every_n_steps` must be an int >= 1"),
        ({"sam_every_n_steps": 2.0}, "`sam_every_n_steps`"),
        ({"sam_every_n_steps": True}, "`sam_every_n_steps`"),
        ({"sam_rho": "0.1"}, "`sam_rho` must be a finite number > 0 or a callable"),
        ({"sam_rho": -0.1}, "`sam_rho`"),
        ({"sam_rho": math.inf}, "`sam_rho`"),
        ({"sam_params": "norms"}, r"`sam_params` must be None .*got 'norms' \(for one pattern: \['norms'\]\)"),
        ({"sam_params": []}, "`sam_params` must be"),
        ({"sam_params": ["net.*", 3]}, "`sam_params` must be"),
        ({"sam_params": 3}, "`sam_params` must be"),
        ({"sam_reuse_alpha": -1.0}, "`sam_reuse_alpha` must be a finite number >= 0"),
    ],
)
def test_bad_values_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAMDigits(**kwargs)
    module = SAMDigits()
    with pytest.raises(ValueError, match=match):
        setattr(module, *next(iter(kwargs.items())))


@pytest.mark.parametrize("name", ["sam_log", "sam_reuse"])
def test_flags_must_be_booleans(name):
    with pytest.raises(TypeError, match=f"`{name}` must be True or False"):  # as `sam` and `sam_adaptive`
        SAMDigits(**{name: "yes"})


def test_reuse_is_refused_under_fsdp2():
    import types

    from pytorch_lightning.strategies import ModelParallelStrategy

    module = SAMDigits(sam=True, sam_reuse=True, sam_every_n_steps=2)
    fsdp2 = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    fake = types.SimpleNamespace(strategy=fsdp2, accumulate_grad_batches=1, optimizers=[])
    with pytest.raises(ValueError, match="`sam_reuse=True` is not supported under ModelParallelStrategy"):
        module._sam_check(fake)


def test_variants_through_lightning_cli(tmp_path):
    pytest.importorskip("jsonargparse")
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    class CLIModel(SAMMixin, pl.LightningModule):
        def __init__(self, hidden: int = 8, **kwargs):
            super().__init__(**kwargs)
            self.net = nn.Linear(4, hidden)

    common = ["--trainer.accelerator=cpu", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  sam: true\n  sam_every_n_steps: 5\n  sam_params: norm\n  sam_log: true\n"
        "  sam_reuse: true\n  sam_reuse_alpha: 0.5\n"
    )
    cli = LightningCLI(CLIModel, run=False, save_config_callback=None, args=[f"--config={config}", *common])
    m = cli.model
    settings = (m.sam_every_n_steps, m.sam_params, m.sam_log, m.sam_reuse, m.sam_reuse_alpha)
    assert settings == (5, "norm", True, True, 0.5)
    args = ["--model.sam_params=[net.0.*, net.1.bias]", "--model.sam_rho=math.sqrt", "--model.lr=0.3", *common]
    cli = LightningCLI(SAMDigits, run=False, save_config_callback=None, args=args)
    assert cli.model.sam_params == ("net.0.*", "net.1.bias")
    assert cli.model.sam_rho is math.sqrt and cli.model.lr == 0.3


# ------------------------------------------------------------------------------------------ DDP
DDP_BODY = """
import copy
import torch, pytorch_lightning as pl
from torch import nn
from torch.utils.data import DistributedSampler
from _lightning import DigitsModule, loaders
from _models import digits
from lightning_landscape.sam import SAMMixin

class SAMDigits(SAMMixin, DigitsModule):
    pass

LR, RHO, ALPHA, K, STEPS, N, B = 0.1, 0.05, 0.7, 2, 5, 384, 32  # 6 batches per rank: one epoch
train, _ = loaders(n_train=N, batch_size=B, shuffle=False)
start = DigitsModule(lr=LR).net
x, y = digits(N + 128)
x, y = x[:N], y[:N]

def grad(net, xb, yb):
    return torch.autograd.grad(nn.functional.cross_entropy(net(xb), yb), list(net.parameters()))

def dot(a, b):
    return sum((u * v).sum() for u, v in zip(a, b))

def reference(alpha, k_sam=K, first_only=False):
    # LookSAM with per-rank ε: g_v is each rank's component of the (all-reduced) g_sam orthogonal to its own g,
    # averaged over the ranks so that both step alike; ``first_only``: ε on the first layer only
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    order = [list(DistributedSampler(range(N), num_replicas=2, rank=r, shuffle=True, seed=seed)) for r in (0, 1)]
    net = copy.deepcopy(start).double()
    params = list(net.parameters())
    g_v = None
    for k in range(STEPS):
        shards = [(x[o[B * k : B * (k + 1)]].double(), y[o[B * k : B * (k + 1)]]) for o in order]
        gs = [grad(net, *s) for s in shards]
        if (k + 1) % k_sam == 0:
            g_sam = []
            for g, s in zip(gs, shards):
                with torch.no_grad():
                    sel = g[:2] if first_only else g
                    norm = torch.sqrt(dot(sel, sel))
                    w = [p.clone() for p in params]
                    for p, gi in zip(params, sel):
                        p.add_(RHO * gi / norm)
                g_sam.append(grad(net, *s))
                with torch.no_grad():
                    for p, wi in zip(params, w):
                        p.copy_(wi)
            update = [(a + b) / 2 for a, b in zip(*g_sam)]
            per_rank = [[u - dot(g, update) / dot(g, g) * gi for u, gi in zip(update, g)] for g in gs]
            g_v = [(a + b) / 2 for a, b in zip(*per_rank)]
        else:
            update = [(a + b) / 2 for a, b in zip(*gs)]
            if g_v is not None:
                scale = alpha * torch.sqrt(dot(update, update)) / torch.sqrt(dot(g_v, g_v))
                update = [u + scale * v for u, v in zip(update, g_v)]
        with torch.no_grad():
            for p, u in zip(params, update):
                p.sub_(LR * u)
    return [p.float() for p in params]

module = SAMDigits(lr=LR, sam=True, sam_rho=RHO, sam_every_n_steps=K, sam_reuse=True, sam_reuse_alpha=ALPHA,
                   sam_log=True, model=copy.deepcopy(start))
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, default_root_dir=OUT,
                     logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.fit(module, train)
weights = [p.detach() for p in module.net.parameters()]
expected, without = reference(ALPHA), reference(0.0)
out = {
    "weights": [w.flatten().tolist() for w in weights],
    "error": max((w - e).abs().max().item() for w, e in zip(weights, expected)),
    "gap": max((w - e).abs().max().item() for w, e in zip(without, expected)),
    "global_step": trainer.global_step,
}
# a subset perturbed (the first layer), per-rank first pass: the other parameters skip that pass's gradient
module = SAMDigits(lr=LR, sam=True, sam_rho=RHO, sam_params=["net.0.*"], model=copy.deepcopy(start))
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, default_root_dir=OUT,
                     logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.fit(module, train)
weights = [p.detach() for p in module.net.parameters()]
expected = reference(0.0, k_sam=1, first_only=True)
out["subset"] = {
    "weights": [w.flatten().tolist() for w in weights],
    "error": max((w - e).abs().max().item() for w, e in zip(weights, expected)),
    "gap": max((w - e).abs().max().item() for w, e in zip(reference(0.0, k_sam=1), expected)),
}
report(out)
"""


@pytest.mark.slow
def test_reuse_and_subset_under_ddp_keep_ranks_in_sync(tmp_path):
    from _ddp import run_ddp

    r0, r1 = run_ddp(tmp_path, DDP_BODY)
    assert r0["weights"] == r1["weights"]  # bitwise identical on both ranks
    assert r0["global_step"] == 5
    assert r0["error"] < 1e-6 and r1["error"] < 1e-6  # measured 3e-8
    assert r0["gap"] > 1e-4  # the reuse matters
    assert r0["subset"]["weights"] == r1["subset"]["weights"]
    assert r0["subset"]["error"] < 1e-6 and r0["subset"]["gap"] > 1e-5  # only the first layer perturbed
