"""Loss heads shared by every measure: logits and labels in, per-example or mean loss out.

The head (logits -> softmax cross-entropy) may be evaluated in float64 while the network runs
in float32: confident examples have 1 - p(y|x) below float32's resolution (NOTES.md), so their
gradients round to garbage unless the head is computed in double precision.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor
from torch.nn import functional as F

LossFn = Callable[[Tensor, Tensor], Tensor]
"""A loss head: ``(logits (N, K), labels (N,)) -> per-example losses (N,)``."""


class LossName(str, Enum):
    """Loss heads a user can choose on the command line."""

    CE = "ce"
    NSCE = "nsce"


def cross_entropy(
    logits: Tensor, labels: Tensor, *, head_dtype: torch.dtype | None = None
) -> Tensor:
    """Per-example softmax cross-entropy ``-ln softmax(logits)[y]``, shape (N,).

    Args:
        logits: (N, K) network outputs.
        labels: (N,) int64 class indices.
        head_dtype: dtype to evaluate the softmax in (e.g. ``torch.float64``); the result is
            returned in that dtype so gradients flowing back keep its precision until the cast.
    """
    if head_dtype is not None:
        logits = logits.to(head_dtype)
    return F.cross_entropy(logits, labels, reduction="none")


def normalized_logits(logits: Tensor, eps: float = 0.0) -> Tensor:
    """Logits divided by their per-example standard deviation over classes.

    normalized-flat-minima.md Eqs. 21-22: f'(z) = f(z) / sqrt(mean_i (f(z)[i] - mu)^2).
    (Subtracting mu as well would change nothing after the softmax.)
    """
    mu = logits.mean(dim=-1, keepdim=True)
    std = ((logits - mu) ** 2).mean(dim=-1, keepdim=True).add(eps).sqrt()
    return logits / std


def normalized_cross_entropy(
    logits: Tensor, labels: Tensor, *, head_dtype: torch.dtype | None = None
) -> Tensor:
    """Per-example normalized-softmax-cross-entropy (NSCE), normalized-flat-minima.md Eq. 20.

    Invariant to scaling and shifting the logits of each example (§5.4).
    """
    if head_dtype is not None:
        logits = logits.to(head_dtype)
    return F.cross_entropy(normalized_logits(logits), labels, reduction="none")


def get_loss(name: LossName | str) -> LossFn:
    """The per-example loss head for a :class:`LossName`."""
    name = LossName(name)
    return {LossName.CE: cross_entropy, LossName.NSCE: normalized_cross_entropy}[name]
