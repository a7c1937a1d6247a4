"""An independent float64 evaluation of a slice: a plain loop over the points.

For each point a float64 copy of the model gets θ* + α d₁ + β d₂ written into its parameters
(under ``torch.no_grad``), then the whole set of examples goes through it in one forward and the
cross-entropy is averaged (``F.cross_entropy``, or the mpmath head of
:func:`tests.references.exact_head` for confident networks). Nothing of flatcli's evaluation is
used: no functional_call, no vmap, no stacking, no batching, no loss head of flatcli's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tests.references import exact_head

F64 = torch.float64


def _outputs(
    model: nn.Module,
    x: Tensor,
    directions: Sequence[Mapping[str, Tensor]],
    points: Sequence[Sequence[float]],
) -> Iterator[Tensor]:
    """The outputs on all of ``x`` of a float64 copy of ``model`` at θ* + Σ cᵢ dᵢ for each point
    (the coordinates written into its parameters, one plain forward each)."""
    net = copy.deepcopy(model).to(F64).eval()
    theta = {n: p.detach().clone().to(F64) for n, p in net.named_parameters()}
    dirs = [{n: t.detach().to("cpu", F64) for n, t in d.items()} for d in directions]
    for coords in points:
        with torch.no_grad():
            for name, p in net.named_parameters():
                value = theta[name].clone()
                for c, d in zip(coords, dirs, strict=False):
                    value += c * d[name]
                p.copy_(value)
            yield net(x)


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
    losses, accuracies = [], []
    for logits in _outputs(model, x.to(F64), directions, points):
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


def reference_loss_slice(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    directions: Sequence[Mapping[str, Tensor]],
    points: Sequence[Sequence[float]],
    loss: str,
) -> tuple[list[float], list[float] | None]:
    """(sample loss, accuracy or None) of ``loss`` at each point, in float64, by torch's losses.

    ``token-ce``: ``F.cross_entropy`` over the flattened tokens with ``ignore_index=-100`` (the
    mean over every counted position) and the token accuracy over counted positions; ``mse``:
    ``F.mse_loss`` and no accuracy; ``bce``: ``F.binary_cross_entropy_with_logits`` and, for
    targets all 0 or 1, the fraction of outputs with logit > 0 exactly where the target is 1.
    The same plain loop as :func:`reference_slice` (:func:`_outputs`): a float64 copy of the
    model, θ* + α d₁ + β d₂ written into its parameters, every example in one forward.
    """
    inputs = x.to(F64) if x.is_floating_point() else x
    binary = bool(((y == 0) | (y == 1)).all()) if y.is_floating_point() else False
    losses: list[float] = []
    accuracies: list[float] = []
    for z in _outputs(model, inputs, directions, points):
        if loss == "token-ce":
            flat_z, flat_y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
            losses.append(float(F.cross_entropy(flat_z, flat_y, ignore_index=-100)))
            counted = flat_y != -100
            hits = (flat_z.argmax(-1) == flat_y) & counted
            accuracies.append(float(hits.sum()) / float(counted.sum()))
        elif loss == "mse":
            losses.append(float(F.mse_loss(z, y.to(F64))))
        elif loss == "bce":
            losses.append(float(F.binary_cross_entropy_with_logits(z, y.to(F64))))
            accuracies.append(float(((z > 0) == (y > 0.5)).double().mean()))
        else:
            raise ValueError(loss)
    return losses, (accuracies if loss == "token-ce" or binary else None)
