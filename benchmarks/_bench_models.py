"""Models, the loss and the machine line shared by the benchmark scripts (digits: flat 64 pixels, 10 classes)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

CRITERION = nn.CrossEntropyLoss()


def load_digits(device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as flat pixels in [0, 1], shuffled with ``seed``, on ``device``."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm].to(device), y[perm].to(device)


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy of ``model`` on ``(x, y)``: the ``loss_fn(model, batch)`` protocol."""
    x, y = batch
    return CRITERION(model(x), y)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity shortcut."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


def resnet_digits(width: int = 16) -> nn.Module:
    """A ResNet-8-like stem and three basic blocks with BatchNorm, on 8x8 digits given as 64 pixels."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[BasicBlock(width) for _ in range(3)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )


def digits_net(name: str, width: int | None = None) -> nn.Module:
    """``mlp`` (64-w-10, tanh; w = 32), ``cnn`` (two tanh convolutions of w and 2w channels; w = 8: 1,898
    parameters) or ``resnet`` (:func:`resnet_digits`, w = 16); ``width`` sets w."""
    if name == "mlp":
        w = width or 32
        return nn.Sequential(nn.Linear(64, w), nn.Tanh(), nn.Linear(w, 10))
    if name == "cnn":
        w = width or 8
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, w, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w, 10),
        )
    return resnet_digits(width or 16)  # a ResNet-8-like stem + 3 basic blocks with BatchNorm


def train_sgd(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> tuple[float, float]:
    """``steps`` full-batch SGD steps (lr 0.1, momentum 0.9); the model is left in eval mode with no
    gradients. Returns the final training loss and accuracy."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, (x, y)).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        out = model(x)
        return float(CRITERION(out, y)), float((out.argmax(1) == y).float().mean())


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> tuple[Any, float]:
    """``(last result, median seconds)`` of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def set_threads(threads: int | None, device: torch.device) -> None:
    """torch's CPU threads: ``threads``, or by default (``None``) 1 on a CPU device (tiny models, robust to a
    busy machine) and torch's own on a GPU; 0 keeps torch's own."""
    if threads is None:
        threads = 1 if device.type == "cpu" else 0
    if threads > 0:
        torch.set_num_threads(threads)


def machine_info(device: torch.device) -> str:
    """Date, versions, device (with its TF32 settings on CUDA), CPUs and load: the header line of a benchmark."""
    load = ""
    with contextlib.suppress(OSError, AttributeError):  # os.getloadavg is Unix-only
        avg = os.getloadavg()
        busy = " (other work running: timings are noisy)" if avg[0] > 0.5 * (os.cpu_count() or 1) else ""
        load = f", load average {avg[0]:.1f} {avg[1]:.1f} {avg[2]:.1f}{busy}"
    if device.type == "cuda":
        tf32 = f"cudnn {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}"
        name = f"{torch.cuda.get_device_name(device)}; TF32: {tf32}"
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return (
        f"date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')};"
        f" python {platform.python_version()}; torch {torch.__version__}; device {device} ({name});"
        f" CPUs {os.cpu_count()}, torch threads {torch.get_num_threads()}{load}"
    )


# ---------------------------------------------------------------------------------------------- GPT-2-shaped LMs
#: GPT-2-shaped causal LMs (transformers' ``GPT2LMHeadModel``, embedding tied to the head) and their batches:
#: ``1m`` ≈ 0.94M parameters (CPU), ``124m`` is GPT-2 small, ``1b`` ≈ 1.01B (18 blocks of width 2048)
LM_SIZES: dict[str, dict[str, int]] = {
    "1m": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=1024, batch=4, seq=128),
    "124m": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, batch=4, seq=1024),
    "1b": dict(n_layer=18, n_embd=2048, n_head=16, vocab_size=50257, batch=4, seq=1024),
}


def gpt2_lm(size: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A random-init GPT-2-shaped ``GPT2LMHeadModel`` of ``size`` (:data:`LM_SIZES`), SDPA attention, seed 0.

    Needs ``transformers`` (imported here, so the other benchmarks do not)."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    shape = {k: v for k, v in LM_SIZES[size].items() if k not in ("batch", "seq")}
    config = GPT2Config(
        **shape, n_positions=LM_SIZES[size]["seq"], bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return GPT2LMHeadModel(config).to(dtype)


def lm_batch(size: str, device: torch.device | str = "cpu", seed: int = 1, rows: slice | None = None) -> dict:
    """``{"input_ids", "attention_mask", "labels"}`` of random tokens, ``batch × seq`` of :data:`LM_SIZES` (``rows``:
    a slice of the samples, e.g. one process's share)."""
    shape = LM_SIZES[size]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=g)
    ids = ids[rows] if rows is not None else ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {k: v.to(device) for k, v in batch.items()}


def lm_loss(model: nn.Module, batch: dict) -> Tensor:
    """The causal LM's own loss, as users write it: ``model(**batch).loss``."""
    return model(**batch).loss
