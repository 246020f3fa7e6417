"""Small models, real data and exact references shared by the tests."""

from __future__ import annotations

import copy

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.func import functional_call


def digits(n: int = 512, seed: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits, scaled to [0, 1], shuffled with ``seed``, first ``n``."""
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)[:n]
    return torch.tensor(x, dtype=torch.float32)[order] / 16.0, torch.tensor(y)[order]


def digits_mlp(seed: int = 0, hidden: int = 24) -> nn.Module:
    """64 -> hidden -> 10 tanh MLP (1,810 parameters at hidden=24)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def dense_hessian(model: nn.Module, loss_fn, batches) -> Tensor:
    """The exact Hessian of the sample-weighted mean loss, in float64."""
    model64 = copy.deepcopy(model).double().eval()
    names = [n for n, p in model64.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model64.named_parameters() if p.requires_grad]
    sizes = [s.numel() for s in shapes]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model64.named_parameters() if p.requires_grad])
    batches64 = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]
    total = sum(len(b[0]) for b in batches64)

    def loss_of(flat: Tensor) -> Tensor:
        params = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=False)}
        bound = _Bound(model64, params)
        return sum(len(b[0]) / total * loss_fn(bound, b) for b in batches64)

    return torch.autograd.functional.hessian(loss_of, flat0, vectorize=True)


class _Bound(nn.Module):
    """Calls ``model`` with ``params`` substituted (for the dense reference only)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.model = model
        self.params = params

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


class OnceSoftplus(torch.autograd.Function):
    """softplus whose backward is marked ``@once_differentiable``: PyTorch's double backward through it
    runs without error but treats its backward's output as a constant."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return nn.functional.softplus(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class SoftplusAct(nn.Module):
    """softplus as a module: through :class:`OnceSoftplus` when ``once``, else PyTorch's own."""

    def __init__(self, once: bool = True) -> None:
        super().__init__()
        self.once = once

    def forward(self, x: Tensor) -> Tensor:
        return OnceSoftplus.apply(x) if self.once else nn.functional.softplus(x)
