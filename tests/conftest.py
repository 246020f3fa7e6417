"""Fixtures shared by test modules (use them explicitly; none is autouse)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """The CPUs are shared: one intra-op thread keeps small forward passes fast and timings stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
