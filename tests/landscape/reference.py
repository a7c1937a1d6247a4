"""An independent float64 evaluation of a slice: a plain loop over the points.

For each point a float64 copy of the model gets θ* + α d₁ + β d₂ written into its parameters
(under ``torch.no_grad``), then the whole set of examples goes through it in one forward and the
cross-entropy is averaged (``F.cross_entropy``, or the mpmath head of
:func:`tests.references.exact_head` for confident networks). Nothing of flatcli's evaluation is
used: no functional_call, no vmap, no stacking, no batching, no loss head of flatcli's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tests.references import exact_head

F64 = torch.float64


def reference_slice(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    directions: Sequence[Mapping[str, Tensor]],
    points: Sequence[Sequence[float]],
    *,
    exact: bool = False,
) -> tuple[list[float], list[float]]:
    """(mean loss, accuracy) at each point, in float64; ``exact``: the mpmath loss head."""
    net = copy.deepcopy(model).to(F64).eval()
    theta = {n: p.detach().clone().to(F64) for n, p in net.named_parameters()}
    dirs = [{n: t.detach().to("cpu", F64) for n, t in d.items()} for d in directions]
    losses, accuracies = [], []
    for coords in points:
        with torch.no_grad():
            for name, p in net.named_parameters():
                value = theta[name].clone()
                for c, d in zip(coords, dirs, strict=False):
                    value += c * d[name]
                p.copy_(value)
            logits = net(x.to(F64))
        if exact:
            loss = float(exact_head(logits, y).loss.mean())
        else:
            loss = float(F.cross_entropy(logits, y))
        losses.append(loss)
        accuracies.append(float((logits.argmax(1) == y).double().mean()))
    return losses, accuracies


def flat(rows: list) -> list[float]:
    """A report's loss (a list, or a list of rows) as one list, row-major."""
    return [v for r in rows for v in (r if isinstance(r, list) else [r])]
