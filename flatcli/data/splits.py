"""The in-memory form of a dataset: whole splits as tensors, and the two ways to walk them.

Every dataset flatcli reads becomes a :class:`Dataset` of :class:`Split` s, each a pair of
tensors ``x`` (N, ...) and ``y`` (N,) int64 held in memory (or on the device) at once. The
measures need the same examples many times (hundreds of Hessian-vector products), so there is
no DataLoader and no per-example Python pipeline: :func:`iter_batches` slices the tensors and
:func:`subset` picks a seeded random subset once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flatcli.errors import DataError, UsageError

__all__ = ["Dataset", "Split", "iter_batches", "subset"]


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: inputs ``x`` (N, ...) and targets ``y``: int64 labels (N,),
    int64 token targets (N, T), or float regression / multi-label targets (N,) or (N, D).

    ``eq=False``: two splits compare by identity (comparing tensors elementwise would be
    ambiguous and slow).

    >>> s = Split(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
    >>> len(s), s.to("cpu", torch.float64).x.dtype, s.y.dtype
    (3, torch.float64, torch.int64)
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.ndim < 1 or self.y.ndim not in (1, 2):
            raise DataError(
                f"a split needs x of shape (N, ...) and y of shape (N,) or (N, T); "
                f"got x {tuple(self.x.shape)} and y {tuple(self.y.shape)}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"x and y must hold the same number of examples; "
                f"got {self.x.shape[0]} inputs and {self.y.shape[0]} labels"
            )
        if self.y.dtype != torch.int64 and not self.y.dtype.is_floating_point:
            raise DataError(f"targets must be int64 or floating point; got {self.y.dtype}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Split:
        """This split on ``device``, float ``x`` cast to ``dtype`` if given (integer token ids
        keep their dtype); ``y`` keeps its dtype."""
        if dtype is not None and not dtype.is_floating_point:
            raise UsageError(f"inputs can only be cast to a floating-point dtype; got {dtype}")
        if not self.x.dtype.is_floating_point:
            dtype = None
        return Split(self.x.to(device=device, dtype=dtype), self.y.to(device=device))


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory.

    Attributes:
        name: the name it was loaded by (``mnist5k``, ``tensors:runs/d.pt``, ...).
        train: the training split.
        test: the test split, or None when the source has none.
        num_classes: number of classes C; labels lie in [0, C).
        input_shape: shape of one input, e.g. (1, 28, 28).
        normalization: the per-channel ``{"mean": [...], "std": [...]}`` that WAS applied to
            inputs in [0, 1] (``x = (pixel - mean) / std``), or None when nothing was (raw
            pixels, or a ``tensors:`` file). A checkpoint records it; analysis passes it back.
        text: for a text dataset (``text:PATH``, ``python-license``), what its windows were cut
            from: ``seq_len``, ``tokenizer``, the text's ``sha256``, ``tokens`` and ``windows``
            (:func:`flatcli.data.text.load_text`); None for any other dataset. For a text
            dataset ``num_classes`` is the vocabulary size V and ``input_shape`` is (T,).
    """

    name: str
    train: Split
    test: Split | None
    num_classes: int
    input_shape: tuple[int, ...]
    normalization: dict | None
    text: dict | None = None

    def split(self, which: Literal["train", "test"]) -> Split:
        """The ``"train"`` or ``"test"`` split; DataError if this dataset has no test split."""
        if which == "train":
            return self.train
        if which == "test":
            if self.test is None:
                raise DataError(
                    f"dataset '{self.name}' has no test split; use --split train "
                    "(or give the data a test split)"
                )
            return self.test
        raise UsageError(f"split must be 'train' or 'test'; got {which!r}")


def subset(split: Split, n: int | None, seed: int) -> Split:
    """The first ``n`` examples of ``split`` after a shuffle seeded by ``seed``.

    The permutation comes from a CPU ``torch.Generator`` seeded with ``seed``, so the same
    (split, n, seed) gives the same examples on every device. ``n=None`` returns ``split``
    itself, unchanged and in its stored order.

    >>> s = Split(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    >>> subset(s, 3, seed=0).y.tolist() == subset(s, 3, seed=0).y.tolist()
    True
    """
    if n is None:
        return split
    n = int(n)
    if n < 0:
        raise UsageError(f"the number of examples must be positive; got {n}")
    if n > len(split):
        raise DataError(
            f"asked for {n} examples but the split holds only {len(split)}; "
            f"use --max-examples {len(split)} or fewer"
        )
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(split), generator=gen)[:n].to(split.x.device)
    return Split(split.x.index_select(0, idx), split.y.index_select(0, idx.to(split.y.device)))


def iter_batches(
    split_or_tensors: Split | tuple[Tensor, Tensor], batch_size: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` slices of at most ``batch_size`` examples, in order, without copying.

    ``batch_size=None`` yields the whole split as one batch.

    >>> s = Split(torch.zeros(5, 2), torch.zeros(5, dtype=torch.int64))
    >>> [len(y) for _, y in iter_batches(s, 2)]
    [2, 2, 1]
    """
    if isinstance(split_or_tensors, Split):
        x, y = split_or_tensors.x, split_or_tensors.y
    else:
        x, y = split_or_tensors
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"x and y must hold the same number of examples; got {x.shape[0]} and {y.shape[0]}"
            )
    n = int(x.shape[0])
    if batch_size is None:
        batch_size = max(n, 1)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1; got {batch_size}")
    return _slices(x, y, n, batch_size)


def _slices(x: Tensor, y: Tensor, n: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, n, batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]
