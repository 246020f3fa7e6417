"""Fixed probe batches, taken once without disturbing training's randomness."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch


def _generators(loader: object) -> list[torch.Generator]:
    """Generators a loader iteration may advance: the loader's and its samplers'."""
    found: list[torch.Generator] = []
    candidates = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates.append(getattr(batch_sampler, "sampler", None))
    for obj in candidates:
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


@contextlib.contextmanager
def preserved_randomness(loader: object | None = None, seed: int | None = None) -> Iterator[None]:
    """Run a block without leaving a trace on any RNG: torch (CPU and CUDA), Python, NumPy,
    and the generators held by ``loader``. Inside, the torch RNG is seeded with ``seed`` when given,
    so a shuffled loader yields the same first batches in a run and in its resumed copy.

    Example:
        >>> before = torch.random.get_rng_state()
        >>> with preserved_randomness(seed=1):
        ...     _ = torch.rand(3)
        >>> torch.equal(before, torch.random.get_rng_state())
        True
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    gens = _generators(loader) if loader is not None else []
    gen_states = [g.get_state() for g in gens]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for g, s in zip(gens, gen_states, strict=True):
            g.set_state(s)


def take_batches(loader: Iterable[Any], num_batches: int, seed: int | None = None) -> list[Any]:
    """The first ``num_batches`` batches of a fresh pass over ``loader`` (fewer if it is shorter).

    Example:
        >>> data = torch.utils.data.TensorDataset(torch.arange(10.0))
        >>> loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
        >>> state = torch.random.get_rng_state()
        >>> [b[0].shape[0] for b in take_batches(loader, 5)]
        [4, 4, 2]
        >>> torch.equal(state, torch.random.get_rng_state())
        True
    """
    out = []
    with preserved_randomness(loader, seed):
        iterator = iter(loader)
        try:
            for _ in range(num_batches):
                out.append(next(iterator))
        except StopIteration:
            pass
        finally:
            del iterator  # shut worker processes down before the RNG is restored
    return out
