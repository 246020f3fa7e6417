"""Random probe vectors drawn from a caller's generator, never from the global RNG."""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_SEED = 0


def make_generator(generator: torch.Generator | None, seed: int = DEFAULT_SEED) -> torch.Generator:
    """The caller's generator, or a fresh CPU generator seeded with ``seed``.

    Example:
        >>> make_generator(None).initial_seed()
        0
    """
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(seed)


def rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Entries ±1 with equal probability, drawn on the generator's device, then moved.

    Example:
        >>> rademacher((3,), torch.Generator().manual_seed(0), torch.float32, torch.device("cpu")).abs()
        tensor([1., 1., 1.])
    """
    bits = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (bits.to(dtype) * 2 - 1).to(device)


def gaussian(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Standard normal entries, drawn on the generator's device, then moved.

    Example:
        >>> gaussian((2, 3), torch.Generator().manual_seed(0), torch.float32, torch.device("cpu")).shape
        torch.Size([2, 3])
    """
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
