"""`params=`: names, glob patterns, predicates and submodules (functional/_params.py), the one selection rule that
SAMMixin's `sam_params` (ParamSelection) shares."""

from __future__ import annotations

import pytest
import torch
from _models import dense_hessian
from torch import nn

from lightning_landscape._sam_variants import ParamSelection
from lightning_landscape.functional._params import ParamSpec, match_parameters, select_parameters
from lightning_landscape.functional.hvp import hvp


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), nn.Linear(4, 2)
    ).double()


NAMES = ["0.weight", "0.bias", "2.0.weight", "2.0.bias", "2.1.weight", "2.1.bias", "3.weight", "3.bias"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("2.*", NAMES[2:6]),  # a glob string
        ("*.bias", ["0.bias", "2.0.bias", "2.1.bias", "3.bias"]),
        ("3.weight", ["3.weight"]),  # an exact name as a string
        (["3.bias", "0.*"], ["0.weight", "0.bias", "3.bias"]),  # names and globs mixed, the model's order
        (lambda name, p: p.dim() == 2, ["0.weight", "2.0.weight", "3.weight"]),  # a predicate
        ("module:2", NAMES[2:6]),  # a submodule (resolved below)
        ("module:2.1+tensor:0.bias", ["0.bias", "2.1.weight", "2.1.bias"]),  # a submodule and a tensor mixed
    ],
)
def test_select_parameters_accepts_globs_predicates_and_modules(params, expected):
    model = net()
    if isinstance(params, str) and ":" in params:  # build the module/tensor items from the model
        items = []
        for part in params.split("+"):
            kind, name = part.split(":")
            items.append(model.get_submodule(name) if kind == "module" else model.get_parameter(name))
        params = items[0] if len(items) == 1 else items
    assert select_parameters(model, params) == expected
    assert ParamSpec(model, params).names == expected


def test_bad_params_name_what_is_wrong():
    model = net()
    with pytest.raises(ValueError, match=r"`params`: 'conv\*' is neither a parameter name nor a pattern"):
        select_parameters(model, ["0.weight", "conv*"])  # a pattern matching nothing is an error naming it
    with pytest.raises(ValueError, match=r"'0\.wieght' is neither"):
        select_parameters(model, "0.wieght")  # a misspelt name: neither a name nor a matching pattern
    with pytest.raises(ValueError, match="Linear given is not a submodule of the model"):
        select_parameters(model, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="must hold the model's own parameters"):
        select_parameters(model, [torch.zeros(3)])
    with pytest.raises(ValueError, match="`params` must be None, a name or pattern"):
        select_parameters(model, 3)
    with pytest.raises(ValueError, match="no parameters selected"):
        select_parameters(model, lambda name, p: False)


def test_patterns_and_modules_skip_frozen_parameters_names_do_not():
    model = net()
    model[0].weight.requires_grad_(False)
    assert select_parameters(model, "0.*") == ["0.bias"]
    assert select_parameters(model, model[0]) == ["0.bias"]
    assert select_parameters(model, lambda n, p: n.startswith("0.")) == ["0.bias"]
    assert select_parameters(model, ["0.weight"]) == ["0.weight"]  # an exact name is taken as given (as before)
    assert select_parameters(model, [model[0].weight]) == ["0.weight"]
    held = nn.ParameterList([model[3].bias, model[0].weight])  # a container of the model's own parameters
    assert select_parameters(model, held) == ["3.bias"]  # (a module: among those with requires_grad)
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="has no parameter with requires_grad"):
        select_parameters(model, model[0])
    with pytest.raises(ValueError, match="Patterns match only parameters with requires_grad"):
        select_parameters(model, "0.*")


def test_glob_selection_gives_the_dense_hessian_block():
    model = net()
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    full = dense_hessian(model, loss_fn, [(x, y)])
    idx = torch.cat([torch.arange(0, 16), torch.arange(44, 54)])  # 0.* (16) and 3.* (the last 10 of 54)
    block = hvp(model, loss_fn, [(x, y)], torch.eye(26, dtype=torch.float64), params=["0.*", "3.*"])
    torch.testing.assert_close(block, full[idx][:, idx], rtol=1e-10, atol=1e-12)  # float64: rounding only


def test_sam_selection_shares_the_rule():
    model = net()
    named = list(model.named_parameters())
    for spec in (["2.*", "3.bias"], lambda n, p: p.dim() == 1):
        flags, _ = match_parameters(named, spec)
        assert ParamSelection(spec).names(model) == [n for (n, _), f in zip(named, flags, strict=True) if f]
    selection = ParamSelection(["2.*", "nope.*"])
    assert selection.names(model) == NAMES[2:6] and selection.unmatched == ["nope.*"]  # unmatched: warned by SAM
    model[0].weight.requires_grad_(False)  # SAM's selection sees every parameter (the optimizer decides)
    assert ParamSelection(["0.*"]).names(model) == ["0.weight", "0.bias"]
