"""Fixtures of the model-zoo tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Batches of 2 gain nothing from intra-op threads, and on a shared 2-core machine the
    threads' spin-waiting made these tests up to 10x slower; restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
