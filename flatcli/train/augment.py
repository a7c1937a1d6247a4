"""Batched data augmentation on device tensors: random horizontal flips and padded random crops.

No per-example Python: a flip is one ``torch.where`` over a per-example mask, a crop is one
advanced-indexing gather from the zero-padded batch with per-example row and column offsets.
All randomness comes from the ``torch.Generator`` passed in, so a seed fixes every draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from flatcli.errors import UsageError
from flatcli.train.config import Augment


def random_flip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> tuple[Tensor, Tensor]:
    """Mirror left-right (last axis) the examples of a random subset, each with probability ``p``.

    Args:
        x: (B, C, H, W) batch.
        generator: source of the per-example coin flips (on ``x.device``).
        p: probability that an example is mirrored.

    Returns:
        The batch (a new tensor) and the (B,) bool mask of mirrored examples.
    """
    mask = torch.rand(x.shape[0], generator=generator, device=x.device) < p  # (B,)
    return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x), mask


def random_crop(
    x: Tensor, padding: int, generator: torch.Generator, fill: float | Sequence[float] = 0.0
) -> tuple[Tensor, Tensor]:
    """Random crops of the original size from each image padded by ``padding`` on every side.

    Output pixel ``(i, j)`` of example ``b`` is padded pixel ``(i + dy[b], j + dx[b])`` with
    ``dy, dx`` uniform in ``{0, ..., 2*padding}``: the content is shifted by
    ``(padding - dy, padding - dx)`` and the vacated border holds ``fill`` (torchvision's
    ``RandomCrop(size, padding)``).

    Args:
        x: (B, C, H, W) batch.
        padding: pixels added on each side before cropping (0 returns ``x`` unchanged).
        generator: source of the offsets (on ``x.device``).
        fill: value of the padding in the units of ``x``: a number, or one per channel
            (0 = zero padding; see :func:`black_fill` for the value of a black pixel in
            normalised inputs).

    Returns:
        The (B, C, H, W) crops and the (B, 2) int64 offsets ``(dy, dx)``.
    """
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator, device=x.device)
    if padding == 0:
        return x, offsets
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)  # (1,) or (C,)
    if fill_t.numel() == 1:
        padded = F.pad(x, (padding, padding, padding, padding), value=float(fill_t))
    else:  # (B, C, H+2p, W+2p), per-channel border
        padded = fill_t.view(1, -1, 1, 1).expand(b, -1, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = x
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chan = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, chan, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)], offsets


def black_fill(normalization: dict | None) -> list[float] | float:
    """Per-channel value of a black pixel after ``normalization`` (``-mean / std``), else 0.

    Padding with it reproduces torchvision's ``RandomCrop(padding=p)`` applied to images
    before ``Normalize(mean, std)``, the usual pipeline of the papers' 1-crop-f and 4-crop-f.
    """
    if not normalization:
        return 0.0
    return [-m / s for m, s in zip(normalization["mean"], normalization["std"], strict=True)]


def check_augmentable(shape: tuple[int, ...], augment: Augment | str) -> None:
    """Raise a UsageError when ``augment`` needs image inputs and examples are not (C, H, W)."""
    augment = Augment(augment)
    if augment is not Augment.NONE and len(shape) != 3:
        raise UsageError(
            f"augment {augment.value!r} needs image inputs of shape (C, H, W) per example. "
            f"Got examples of shape {tuple(shape)}; use augment 'none'."
        )


def augment_batch(
    x: Tensor,
    augment: Augment | str,
    generator: torch.Generator,
    fill: float | Sequence[float] = 0.0,
) -> Tensor:
    """Apply one of fisher-gamma-local-minima.md §7.1's schemes to a (B, C, H, W) batch.

    ``crop{1,4}-flip`` crops first, then flips (the order does not change the distribution:
    the offset distribution is symmetric).
    """
    augment = Augment(augment)
    if augment is Augment.NONE:
        return x
    if augment.padding:
        x, _ = random_crop(x, augment.padding, generator, fill)
    x, _ = random_flip(x, generator)
    return x
