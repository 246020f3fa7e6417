"""Taking probe batches leaves every random stream where it was."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_landscape.callbacks._probe import take_batches


def _order(loader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def test_loader_generator_restored():
    data = TensorDataset(torch.arange(20))
    loader = DataLoader(data, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(7))
    reference = DataLoader(data, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(7))
    probe = take_batches(loader, 2)
    assert [len(b[0]) for b in probe] == [5, 5]
    assert _order(loader) == _order(reference)


def test_same_probe_from_a_seed_in_a_resumed_run():
    data = TensorDataset(torch.arange(20))
    loader = DataLoader(data, batch_size=5, shuffle=True)
    first = take_batches(loader, 1, seed=3)
    torch.manual_seed(123)  # a resumed process starts from another global state
    second = take_batches(loader, 1, seed=3)
    assert torch.equal(first[0][0], second[0][0])


class _NoisyDataset(Dataset):
    """Draws from Python's and NumPy's global RNGs in __getitem__ (augmentation-style)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        return torch.tensor([i + random.random() + np.random.rand()])


def test_python_and_numpy_rngs_restored():
    random.seed(0)
    np.random.seed(0)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    take_batches(DataLoader(_NoisyDataset(), batch_size=4, shuffle=True), 2)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.random.get_rng_state(), before[2])
