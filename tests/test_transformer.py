"""Transformer models: fused attention has no double backward; the HVP falls back and says so."""

from __future__ import annotations

import copy

import pytest
import torch
from _lightning import DigitsModule, loaders, read_events, trainer
from _models import cross_entropy, dense_hessian, digits
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_landscape import HessianCallback
from lightning_landscape import functional as LF


class DigitsTransformer(nn.Module):
    """Digits as 8 tokens of 8 pixels -> a one-layer TransformerEncoder -> 10 classes."""

    def __init__(self, d_model: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, d_model)
        # gelu, not relu: finite differences of the gradient see ReLU kinks that the autograd Hessian ignores
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=16, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.reshape(-1, 8, 8))).mean(dim=1))


@pytest.fixture(scope="module")
def batch():
    x, y = digits(64)
    return [(x, y)]


@pytest.fixture(scope="module")
def hessian(batch):
    with sdpa_kernel(SDPBackend.MATH):
        return dense_hessian(DigitsTransformer(), cross_entropy, batch)


def test_fused_attention_breaks_plain_double_backward(batch):
    model = DigitsTransformer()
    with pytest.raises(RuntimeError, match="derivative"):
        LF.hessian_eigenvalues(model, cross_entropy, batch, hvp_method="double_backward")


def test_auto_falls_back_to_math_attention_and_is_exact(batch, hessian):
    model = DigitsTransformer()
    h = hessian
    exact = torch.linalg.eigvalsh(h).flip(0)
    r = LF.hessian_eigenvalues(model, cross_entropy, batch, k=2, tol=1e-4)
    assert r.hvp_method == "double_backward+math_sdpa"
    torch.testing.assert_close(r.eigenvalues, exact[:2], rtol=1e-3, atol=0)
    t = LF.hessian_trace(model, cross_entropy, batch)
    assert t.hvp_method == "double_backward+math_sdpa"
    assert abs(t.estimate - h.trace().item()) <= 4 * t.stderr


def test_finite_difference_fallback_agrees(batch, hessian):
    model = DigitsTransformer()
    exact = torch.linalg.eigvalsh(hessian)[-1]
    r = LF.hessian_eigenvalues(model, cross_entropy, batch, k=1, hvp_method="finite_difference")
    assert r.hvp_method == "finite_difference"
    assert abs(r.eigenvalues[0] - exact) / exact < 2e-3


def test_callback_logs_which_method_ran(tmp_path):
    train, _ = loaders(n_train=64, batch_size=32)
    cb = HessianCallback(every_n_train_steps=1, top_k=1, trace=True, trace_hvps=9, strict=True)
    module = DigitsModule(model=copy.deepcopy(DigitsTransformer()))
    trainer(tmp_path, [cb], max_steps=2).fit(module, train)
    assert cb.last_metrics["hessian/eigenvalue_1"] > 0
    assert cb._resolved_method == "double_backward+math_sdpa"
    texts = read_events(tmp_path).Tags()["tensors"]
    assert any("hessian/hvp_method" in t for t in texts)
