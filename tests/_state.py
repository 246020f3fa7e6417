"""Snapshots of everything a measurement must leave as it found it."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn


def snapshot(model: nn.Module) -> dict:
    """Weights, buffers, ``.grad``, ``requires_grad``, module modes and the torch/Python/NumPy RNGs."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "torch_rng": torch.random.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),
    }


def assert_same(before: dict, after: dict) -> None:
    """Every entry of two snapshots is bitwise equal."""
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for key, g in before["grads"].items():
        assert (g is None and after["grads"][key] is None) or torch.equal(g, after["grads"][key]), key
    assert before["requires_grad"] == after["requires_grad"]
    assert before["modes"] == after["modes"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert before["py_rng"] == after["py_rng"]
    assert np.array_equal(before["np_rng"], after["np_rng"])
