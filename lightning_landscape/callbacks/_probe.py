"""Fixed probe batches, taken once without disturbing training in any way.

Two ways, chosen per loader (:func:`safe_to_draw`):

- **copied as they pass** (any loader): the first ``num_batches`` batches the loop itself yields are cloned in
  ``on_train_batch_start`` / ``on_validation_batch_start``, already moved to the device and converted by the
  precision plugin. No loader is iterated by the plugin, so nothing it holds can change: persistent workers'
  iterators, one-shot streams (generators, ``IterableDataset``), combined loaders' structure. The probe is ready
  after ``num_batches`` training batches (at the end of the first epoch if it is shorter);
- **a separate draw** (only a ``torch.utils.data.DataLoader`` over a map-style dataset, with torch's own samplers,
  without persistent workers): the first batches of a fresh pass with every random generator restored and the
  shuffle seeded by the callback's ``seed``, converted as the loop converts them; ready before the first step and
  the same batches in a run and its resumed copy.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from lightning_landscape.functional._batches import apply_to_tensors


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


#: samplers whose iteration changes nothing but the generators :func:`preserved_randomness` restores
_STOCK_SAMPLERS = (
    torch.utils.data.SequentialSampler,
    torch.utils.data.RandomSampler,
    torch.utils.data.SubsetRandomSampler,
    torch.utils.data.WeightedRandomSampler,
    torch.utils.data.distributed.DistributedSampler,
)


def safe_to_draw(loader: object) -> bool:
    """Whether the plugin may iterate ``loader`` itself: a ``DataLoader`` over a map-style dataset with torch's own
    samplers and no persistent workers (iterating one of those leaves nothing behind once the RNGs are restored).

    Example:
        >>> data = torch.utils.data.TensorDataset(torch.arange(4.0))
        >>> safe_to_draw(torch.utils.data.DataLoader(data, batch_size=2, shuffle=True))
        True
        >>> stream = torch.utils.data.DataLoader((torch.ones(2) for _ in range(3)), batch_size=None)
        >>> safe_to_draw(stream), safe_to_draw([torch.ones(2)])
        (False, False)
    """
    if not isinstance(loader, torch.utils.data.DataLoader):
        return False
    if isinstance(loader.dataset, torch.utils.data.IterableDataset) or not hasattr(loader.dataset, "__getitem__"):
        return False
    if loader.num_workers > 0 and loader.persistent_workers:
        return False
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:  # batch_size=None: one sample per batch, drawn by loader.sampler
        return type(loader.sampler) in _STOCK_SAMPLERS
    if type(batch_sampler) is not torch.utils.data.BatchSampler:
        return False
    return type(batch_sampler.sampler) in _STOCK_SAMPLERS


def copy_batch(batch: Any) -> Any:
    """A copy of ``batch`` whose tensors the training step cannot change afterwards (detached clones).

    Example:
        >>> x = torch.ones(2)
        >>> copied = copy_batch({"x": x})
        >>> x.add_(1.0) is x, copied["x"]
        (True, tensor([1., 1.]))
    """
    with torch.inference_mode(False):
        return apply_to_tensors(batch, lambda t: t.detach().clone())


def take_batches(
    loader: Iterable[Any],
    num_batches: int | Callable[[list[Any]], bool],
    seed: int | None = None,
    transform: Callable[[Any], Any] | None = None,
) -> list[Any]:
    """The first ``num_batches`` batches of a fresh pass over ``loader`` (fewer if it is shorter), each passed
    through ``transform`` (the training loop's conversion) inside the same preserved randomness. ``num_batches``
    may be a predicate instead: batches are taken until it holds for the list taken so far.

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
            complete = num_batches if callable(num_batches) else (lambda taken: len(taken) >= num_batches)
            while not complete(out):
                batch = next(iterator)
                out.append(transform(batch) if transform is not None else batch)
        except StopIteration:
            pass
        finally:
            del iterator  # shut worker processes down before the RNG is restored
    return out
