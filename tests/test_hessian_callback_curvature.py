"""HessianCallback's issue-15 options in a real Trainer.fit: both ends of the spectrum, the GGN, per-block
eigenvalues and traces with their heatmap, and the gradient's overlap with the top eigenspace — each against a
dense float64 matrix of the same probe at the final weights (solver tol 1e-8: agreement to 1e-4 relative leaves
room only for float32 products, ~1e-6)."""

from __future__ import annotations

import pytest
import torch
from _lightning import DigitsModule, loaders, read_events, scalar_steps, trainer
from _models import cross_entropy, dense_hessian, digits_mlp

from lightning_landscape import HessianCallback
from lightning_landscape import functional as LF

TIGHT = dict(tol=1e-8, max_hvps=400)


def fit(tmp_path, cb: HessianCallback, epochs: int = 1) -> DigitsModule:
    """A 310-parameter tanh MLP, 2 steps per epoch (early: its Hessian is indefinite), measured every epoch."""
    train, _ = loaders(n_train=64, batch_size=32, shuffle=False)
    module = DigitsModule(lr=0.5, model=digits_mlp(hidden=4))
    trainer(tmp_path, [cb], max_epochs=epochs).fit(module, train)
    return module


def test_both_ends_of_the_spectrum(tmp_path):
    cb = HessianCallback(every_n_epochs=1, top_k=2, which="both", **TIGHT)
    module = fit(tmp_path, cb)
    exact = torch.linalg.eigvalsh(dense_hessian(module.net, cross_entropy, cb._probe))
    m = cb.last_metrics
    assert exact[0] < -1e-3  # a saddle: the test means something
    assert m["hessian/eigenvalue_1"] == pytest.approx(exact[-1].item(), rel=1e-4)
    assert m["hessian/eigenvalue_2"] == pytest.approx(exact[-2].item(), rel=1e-4)
    assert m["hessian/eigenvalue_min_1"] == pytest.approx(exact[0].item(), rel=1e-4)
    assert m["hessian/eigenvalue_min_2"] == pytest.approx(exact[1].item(), rel=1e-4)
    assert "hessian/eigenvalue_min_1" in read_events(tmp_path).Tags()["scalars"]


def test_ggn_instead_of_the_hessian(tmp_path):
    cb = HessianCallback(every_n_epochs=1, curvature="ggn", output_loss="cross_entropy", **TIGHT)
    module = fit(tmp_path, cb)
    expected = LF.hessian_eigenvalues(
        module.net.double(),
        None,
        [(x.double(), y) for x, y in cb._probe],
        k=1,
        curvature="ggn",
        output_loss="cross_entropy",
        tol=1e-10,
    ).eigenvalues[0]
    assert cb.last_metrics["ggn/eigenvalue_1"] == pytest.approx(expected.item(), rel=1e-4)
    tags = set(read_events(tmp_path).Tags()["scalars"])
    assert {"ggn/eigenvalue_1", "ggn/num_hvps", "ggn/seconds"} <= tags and not any(
        t.startswith("hessian/") for t in tags
    )


def test_blocks_eigenvalues_traces_and_heatmap(tmp_path, monkeypatch):
    cb = HessianCallback(every_n_epochs=1, blocks="layer", trace=True, block_trace_hvps=300, **TIGHT)
    calls = []
    original = LF.blocks.block_curvature

    def spy(*args, **kwargs):
        calls.append(kwargs)
        result = original(*args, **kwargs)
        calls[-1] = (kwargs["operator"], kwargs["init"], result)
        return result

    monkeypatch.setattr("lightning_landscape.callbacks.hessian.block_curvature", spy)
    module = fit(tmp_path, cb, epochs=2)
    assert len(calls) == 2  # one per measurement (steps 2 and 4)
    for operator, init, result in calls:  # the whole measurement's operator and λ1's vector serve the blocks
        assert isinstance(operator, LF.LossOperator) and init.shape == (1, 310)
        # no start product (H z), no method chosen or checked again: only the blocks' own products
        assert result.total_hvps == sum(result.num_hvps.values())
    assert cb._block_params == {"0": ["net.0.weight", "net.0.bias"], "2": ["net.2.weight", "net.2.bias"]}
    h = dense_hessian(module.net, cross_entropy, cb._probe)
    for name, (lo, hi) in {"0": (0, 260), "2": (260, 310)}.items():
        block = h[lo:hi, lo:hi]
        assert cb.last_metrics[f"hessian/{name}/eigenvalue_1"] == pytest.approx(
            torch.linalg.eigvalsh(block)[-1].item(), rel=1e-4
        )
        assert cb.last_metrics[f"hessian/{name}/trace"] == pytest.approx(block.trace().item(), rel=1e-4)  # exact
    acc = read_events(tmp_path)
    assert sorted(scalar_steps(acc, "hessian/0/eigenvalue_1")) == [2, 4]
    assert [e.step for e in acc.Images("hessian/blocks")] == [2, 4]
    assert cb.block_history["steps"] == [2, 4] and len(cb.block_history["eigenvalues"]["2"]) == 2
    assert cb.state_dict()["block_history"]["steps"] == [2, 4]  # the heatmap survives a resume


def test_many_blocks_keep_the_heatmap_and_drop_the_tags(tmp_path, monkeypatch):
    import lightning_landscape.callbacks.hessian as hessian_module

    monkeypatch.setattr(hessian_module, "MAX_BLOCK_TAGS", 3)
    cb = HessianCallback(every_n_epochs=1, blocks="parameter", max_hvps=20)
    fit(tmp_path, cb)
    acc = read_events(tmp_path)
    assert not any(t.startswith("hessian/net.0") for t in acc.Tags()["scalars"])  # 4 blocks > 3: no tags
    assert "hessian/blocks/num_hvps" in acc.Tags()["scalars"] and acc.Images("hessian/blocks")
    assert len(cb.block_history["eigenvalues"]) == 4


def test_gradient_overlap(tmp_path):
    k = 3
    cb = HessianCallback(every_n_epochs=1, top_k=k, gradient_overlap=True, **TIGHT)
    module = fit(tmp_path, cb)
    net = module.net.double()
    probe = [(x.double(), y) for x, y in cb._probe]
    h = dense_hessian(net, cross_entropy, probe)
    vectors = torch.linalg.eigh(h).eigenvectors[:, -k:]
    with LF.LossOperator(net, cross_entropy, probe) as op:
        _, g = op.gradient()
    expected = (vectors.T @ g).pow(2).sum() / g.pow(2).sum()
    assert cb.last_metrics["hessian/gradient_overlap"] == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"which": "top"}, "`which` must be one of"),
        ({"curvature": "gauss_newton"}, "`curvature` must be one of"),
        ({"curvature": "ggn"}, "needs the loss split"),
        ({"curvature": "ggn", "output_loss": "hinge"}, "`output_loss` must be one of"),
        ({"output_loss": "mse"}, "are for curvature="),
        ({"curvature": "ggn", "output_loss": "mse", "blocks": "layer"}, "`blocks` measures the Hessian"),
        ({"which": "smallest", "gradient_overlap": True}, "needs the top eigenvectors"),
        ({"blocks": "layers"}, "`blocks` must be None"),
    ],
)
def test_bad_arguments_are_refused_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianCallback(**kwargs)


def test_hessian_and_ggn_callbacks_side_by_side(tmp_path):
    """Two HessianCallbacks on one trainer (the Hessian and the GGN): distinct state keys, both measured."""
    hessian = HessianCallback(every_n_epochs=1)
    ggn = HessianCallback(every_n_epochs=1, curvature="ggn", output_loss="cross_entropy")
    assert hessian.state_key != ggn.state_key
    train, _ = loaders(n_train=64, batch_size=32, shuffle=False)
    trainer(tmp_path, [hessian, ggn], max_epochs=1).fit(DigitsModule(model=digits_mlp(hidden=4)), train)
    tags = set(read_events(tmp_path).Tags()["scalars"])
    assert {"hessian/eigenvalue_1", "ggn/eigenvalue_1"} <= tags
