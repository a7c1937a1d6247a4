"""The one way flatcli walks over examples: contiguous chunks moved to the model's device and dtype.

Every computation that sums over examples (curvature products, diagonals, worst-case ascents,
logit checks) slices ``x`` and ``y`` into chunks of ``batch_size`` examples, moves each chunk to
the device, and casts floating-point inputs to the model's dtype (integer inputs such as token
ids and the labels keep theirs). :func:`iter_chunks` is that loop.

An example is a slice along the first dimension, so a chunk of token inputs (N, T) holds whole
sequences (never part of one), and nothing in the loop normalises: a chunk contributes a SUM
over its examples and the caller divides once by the global count. ``token-ce``'s weighting of a
sequence by its counted positions is fixed from all N targets when the head is built
(:func:`flatcli.curvature.losses.sample_loss`), so neither the chunk size nor the shards of a
``torchrun`` world change the sample loss or its curvature (up to rounding).

>>> import torch
>>> x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
>>> chunks = iter_chunks(x, y, 2, "cpu", torch.float64)
>>> [(c.start, c.stop, tuple(c.x.shape), c.x.dtype) for c in chunks]
[(0, 2, (2, 2), torch.float64), (2, 4, (2, 2), torch.float64), (4, 5, (1, 2), torch.float64)]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from flatcli.errors import UsageError

__all__ = ["Chunk", "iter_chunks", "move_inputs"]


class Chunk(NamedTuple):
    """Examples ``start:stop`` of the full set, on the device (``y`` None when no labels)."""

    start: int
    stop: int
    x: Tensor
    y: Tensor | None

    @property
    def size(self) -> int:
        """Number of examples in the chunk."""
        return self.stop - self.start


def move_inputs(x: Tensor, device: torch.device | str, dtype: torch.dtype | None) -> Tensor:
    """``x`` on ``device``; floating-point inputs cast to ``dtype`` (None: kept as they are)."""
    x = x.to(device, non_blocking=True)
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        x = x.to(dtype)
    return x


def iter_chunks(
    x: Tensor,
    y: Tensor | None,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype | None,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Chunk]:
    """Chunks of ``batch_size`` consecutive examples of ``(x, y)``, each moved to the device.

    Args:
        x: inputs (N, ...), on any device.
        y: labels (N,) or None.
        batch_size: examples per chunk (the last one may be smaller).
        device: where each chunk goes (the model's device).
        dtype: the dtype floating-point inputs are cast to (the model's); None keeps them.
        start, stop: walk over examples ``start:stop`` only (default all).

    Yields:
        :class:`Chunk` ``(start, stop, x, y)`` in order; together they cover ``start:stop``.
    """
    n = int(x.shape[0]) if stop is None else int(stop)
    step = int(batch_size)
    if step < 1:
        raise UsageError(f"batch_size must be a positive integer. Got {batch_size}.")
    for a in range(int(start), n, step):
        b = min(n, a + step)
        yb = None if y is None else y[a:b].to(device, non_blocking=True)
        yield Chunk(a, b, move_inputs(x[a:b], device, dtype), yb)
