"""A Hugging Face causal LM as people write it (issue 14): dict batches, ``self.model(**batch).loss``, SAMMixin.

The model is a tiny random-init ``GPT2LMHeadModel`` (2 blocks, width 32, vocabulary 64: 28,544 parameters, the
embedding tied to the head; dropout 0.1 as configured by default) with ``attn_implementation="sdpa"``, no
download. Batches are dicts ``{"input_ids", "attention_mask", "labels"}``, right-padded (masked, labels ``-100``);
samples ``2i`` and ``2i + 1`` share a length, so both processes of the sharded run hold as many tokens as each
other and the mean of their token-mean losses is the token mean of the unsharded twin.

- One process: all three callbacks on the module's own ``training_step`` loss with SAM on. Fused SDPA has no
  double backward, so ``auto`` runs double backward under the math SDPA backend and says so.
- Two gloo processes, ``ModelParallelStrategy`` with ``fully_shard`` on each block and on the root (which then
  owns the embeddings and the final LayerNorm), float64: the same callbacks and SAM, and the measurements against
  the same weights unsharded.

Four tests guard library bugs found while writing this file, now fixed: FSDP2 leaves the root's parameters
unsharded after a forward without backward (the sharded operator and SAM now reshard before writing shards and
after restoring them), and the finite-difference step was far too large along a float32 transformer's top
eigenvector (it is now scaled by max|v|, not rms v).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import pytorch_lightning as pl
import torch
import transformers
from _lightning import read_events
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_landscape import HessianCallback, LossLandscapeCallback, SAMMixin, SharpnessCallback
from lightning_landscape import functional as LF

TESTS = Path(__file__).resolve().parent
VOCAB, LENGTH, STEPS = 64, 16, 4  # measurements at steps 2 and 4
transformers.logging.set_verbosity_error()  # tiny vocabulary: GPT-2's default bos/eos ids do not fit it


def build_lm(dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """A 2-block GPT-2 (28,544 parameters), random init from seed 0, SDPA attention."""
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(dtype)


class TokenData(Dataset):
    """Random token sequences, right-padded; samples ``2i`` and ``2i + 1`` have the same length (16, 14, 12, 10)."""

    def __init__(self, n: int = 64) -> None:
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(1))
        self.lengths = [LENGTH - 2 * ((i // 2) % 4) for i in range(n)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.arange(LENGTH) < self.lengths[i]
        ids = torch.where(mask, self.ids[i], 0)
        return {"input_ids": ids, "attention_mask": mask.long(), "labels": torch.where(mask, ids, -100)}


def collate(indices) -> dict[str, torch.Tensor]:
    """Samples ``indices`` of :class:`TokenData` as one batch (what a DataLoader would give)."""
    data = TokenData()
    items = [data[i] for i in indices]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


class CausalLM(SAMMixin, pl.LightningModule):
    """What a user writes around a Hugging Face model."""

    def __init__(self, dtype: torch.dtype = torch.float32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = build_lm(dtype)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def callbacks() -> list:
    """All three callbacks, small: on the module's own ``training_step`` loss, every 2 steps."""
    return [
        HessianCallback(every_n_train_steps=2, top_k=2, trace=True, trace_hvps=9, num_batches=1),
        SharpnessCallback(every_n_train_steps=2, steps=4, samples=4, num_batches=1),
        LossLandscapeCallback(every_n_train_steps=2, steps=3, steps_1d=3, num_batches=1),
    ]


# ---------------------------------------------------------------------------------------------- one process
def _fit(tmp_path: Path, cbs: list, logger: bool = False) -> dict[str, torch.Tensor]:
    module = CausalLM(sam=True, sam_rho=0.05)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=STEPS, logger=logger, callbacks=cbs,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few loader workers, ...
        trainer.fit(module, DataLoader(TokenData(), batch_size=8))
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.slow
def test_hf_causal_lm_with_all_callbacks_and_sam(tmp_path, one_thread):
    plain = _fit(tmp_path / "plain", [])
    cbs = callbacks()
    watched = _fit(tmp_path / "watched", cbs, logger=True)
    assert plain.keys() == watched.keys()
    assert all(torch.equal(plain[n], watched[n]) for n in plain)  # bitwise: measuring left training as it was
    assert [cb._measured_in_fit for cb in cbs] == [2, 2, 2]
    metrics = {k: v for cb in cbs for k, v in cb.last_metrics.items()}
    for key in ("hessian/eigenvalue_1", "hessian/trace", "sharpness/worst_case_l2", "landscape/center_loss"):
        assert key in metrics, key
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["hessian/eigenvalue_1"] >= metrics["hessian/eigenvalue_2"] > 0
    # fused SDPA kernels have no double backward: `auto` measures under the math backend, and the note says so
    assert cbs[0]._resolved_method == "double_backward+math_sdpa"
    assert any("hessian/hvp_method" in t for t in read_events(tmp_path / "watched").Tags()["tensors"])


def test_float32_finite_difference_product_along_the_top_eigenvector(one_thread):
    model, batch = build_lm(), [collate(range(8))]
    exact = LF.hessian_eigenvalues(model, lm_loss, batch, tol=1e-5, max_hvps=80, generator=torch.Generator())
    assert exact.hvp_method == "double_backward+math_sdpa" and exact.converged
    v = exact.eigenvectors[:1]
    with LF.LossOperator(model, lm_loss, batch, hvp_method="finite_difference") as op:
        rayleigh = float(op.hvp(v)[0] @ v[0])
    assert rayleigh == pytest.approx(float(exact.eigenvalues[0]), rel=1e-2)


# ---------------------------------------------------------------------------------------------- two processes
_SHARDED = r"""
import hashlib, json, math, os, sys
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, sys.argv[2])
from test_sharded_transformer import CausalLM, TokenData, build_lm, callbacks, collate, lm_loss
from lightning_landscape import functional as LF
from lightning_landscape.functional._sharded import sharded_parameters

OUT = sys.argv[1]
RANK = int(os.environ.get("LOCAL_RANK", 0))
torch.set_num_threads(1)


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings (tied to the head) and the final LayerNorm


class ShardedLM(CausalLM):
    def configure_model(self):
        shard(self.model, self.device_mesh["data_parallel"])


def fit(cbs):
    module = ShardedLM(dtype=torch.float64, sam=True, sam_rho=0.05)
    data = TokenData()
    # rank r gets samples r, r + 2, ...: step k of both ranks together is step k of one process with batch 8
    sampler = DistributedSampler(data, num_replicas=2, rank=RANK, shuffle=False)  # Lightning's would shuffle
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        use_distributed_sampler=False, max_steps=4, logger=False, callbacks=cbs, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4, sampler=sampler))
    return module


def unsharded(module):
    # FSDP2 keeps the root's parameters unsharded after a forward without backward (plain tensors, not DTensors)
    return [n for n, p in module.model.named_parameters() if not hasattr(p, "full_tensor")]


def full(module):
    module.model.reshard()  # a no-op unless the root was left unsharded; a sharded operator on it would crash
    return {n: p.full_tensor().detach().clone() for n, p in module.model.named_parameters()}


def twin_of(weights, dtype):
    twin = build_lm(dtype)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(weights[n])
    return twin


def local_rows(model, v):
    # global flat vectors [k, n] -> this rank's rows of every parameter
    _, _, slices, _, _ = sharded_parameters(model)
    parts, i = [], 0
    for s in slices:
        size = math.prod(s.global_shape)
        whole = v[:, i:i + size].reshape(v.shape[0], *s.global_shape)
        parts.append((whole if s.replicated else whole[:, s.start:s.stop]).reshape(v.shape[0], -1))
        i += size
    return torch.cat(parts, dim=1)


out = {}
module = fit([])
out["left_unsharded_plain"] = unsharded(module)
plain = full(module)
cbs = callbacks()
module = fit(cbs)
out["left_unsharded"] = unsharded(module)
watched = full(module)
out["bitwise"] = plain.keys() == watched.keys() and all(torch.equal(plain[n], watched[n]) for n in plain)
out["digest"] = hashlib.sha256(b"".join(w.numpy().tobytes() for w in watched.values())).hexdigest()
out["metrics"] = {k: v for cb in cbs for k, v in cb.last_metrics.items() if not k.endswith("/seconds")}
out["measured"] = [cb._measured_in_fit for cb in cbs]
out["method"] = cbs[0]._resolved_method

# the trained weights sharded (this rank's 4 samples of the first batch) and unsharded (all 8), float64
mine, union = [collate(range(RANK, 8, 2))], [collate(range(8))]
twin = twin_of(watched, torch.float64)
runs = (("sharded", module.model, mine, "auto"), ("fd", twin, union, "finite_difference"),
        ("exact", twin, union, "double_backward+math_sdpa"))
for key, model, batches, method in runs:
    r = LF.hessian_eigenvalues(model, lm_loss, batches, k=1, tol=1e-9, max_hvps=80, hvp_method=method,
                               generator=torch.Generator().manual_seed(0))
    out[key], out[key + "_method"], out[key + "_converged"] = r.eigenvalues.item(), r.hvp_method, r.converged

# a 3x3 slice along the same two directions (small random ones, every parameter), sharded and not
d = 0.02 * torch.randn(2, sum(p.numel() for p in twin.parameters()), generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)
sliced = LF.loss_surface(module.model, lm_loss, mine, steps=3, directions=local_rows(module.model, d))
out["surface"] = sliced.losses.reshape(-1).tolist()
out["surface_ref"] = LF.loss_surface(twin, lm_loss, union, steps=3, directions=d).losses.reshape(-1).tolist()
module.model.reshard()

# float32, as most models are trained: the same weights, sharded afresh, against double backward unsharded
m32 = twin_of(watched, torch.float32)
shard(m32, module.device_mesh["data_parallel"])
kw = dict(k=1, tol=1e-4, max_hvps=60, generator=torch.Generator().manual_seed(0))
out["float32_sharded"] = LF.hessian_eigenvalues(m32, lm_loss, mine, **kw).eigenvalues.item()
out["float32_exact"] = LF.hessian_eigenvalues(twin_of(watched, torch.float32), lm_loss, union, **kw).eigenvalues.item()
with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
    json.dump(out, f)
"""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("sharded_transformer")
    script = tmp / "fit.py"
    script.write_text(_SHARDED)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp), str(TESTS)], cwd=tmp, env=env, timeout=300, capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_sharded_hf_lm_with_all_callbacks_and_sam(sharded):
    for rank in sharded:
        assert rank["measured"] == [2, 2, 2]
        assert rank["method"] == "finite_difference"  # FSDP2 has no double backward: differences of gradients
        m = rank["metrics"]
        for key in ("hessian/eigenvalue_1", "hessian/trace", "sharpness/worst_case_l2", "landscape/center_loss"):
            assert key in m, key
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
        assert rank["left_unsharded_plain"] == []  # plain training ends with a backward: FSDP resharded
    assert sharded[0]["digest"] == sharded[1]["digest"]  # both ranks hold the same model
    assert sharded[0]["metrics"] == sharded[1]["metrics"]  # and measured the same numbers


@pytest.mark.slow
def test_sharded_top_eigenvalue_equals_unsharded(sharded):
    """Float64: the sharded operator's central differences have step h ≈ eps^(1/3)/8 ≈ 7.6e-7 relative; along the
    top eigenvector their O(h²) truncation is ~1e-5 relative (float32 runs of this model: 1.1e-4 at h = 3e-6), and
    transformers computes the loss in float32 (``ForCausalLMLoss`` casts the logits with ``.float()``), which
    limits the exact product to ~1e-6. So: 1e-4 against double backward (measured: 3e-6); 1e-8 against unsharded
    finite differences (same step, same float32 rounding, only the processes' summation order differs)."""
    for rank in sharded:
        assert rank["sharded_method"] == "finite_difference" and rank["sharded_converged"]
        assert rank["exact_method"] == "double_backward+math_sdpa" and rank["exact_converged"]
        assert rank["sharded"] == pytest.approx(rank["exact"], rel=1e-4)
        assert rank["sharded"] == pytest.approx(rank["fd"], rel=1e-8)
    assert sharded[0]["sharded"] == sharded[1]["sharded"]


@pytest.mark.slow
def test_sharded_training_with_callbacks_is_bitwise_unchanged(sharded):
    for rank in sharded:
        assert rank["left_unsharded"] == []
        assert rank["bitwise"]


@pytest.mark.slow
def test_sharded_slice_equals_unsharded(sharded):
    for rank in sharded:
        # losses in float32 (transformers' cast), averaged over 2 processes in float64: a few float32 ulps
        assert rank["surface"] == pytest.approx(rank["surface_ref"], rel=1e-6)


@pytest.mark.slow
def test_sharded_float32_top_eigenvalue_equals_unsharded(sharded):
    for rank in sharded:
        assert rank["float32_sharded"] == pytest.approx(rank["float32_exact"], rel=1e-2)
