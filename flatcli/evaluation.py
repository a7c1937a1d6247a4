"""Accuracy and mean loss of a model on a set of examples: the one evaluation loop.

Training evaluates after each epoch (:func:`flatcli.train.fit`); ``rank --evaluate`` measures
each checkpoint's train and test numbers (:func:`flatcli.rank.sweep.evaluate_generalization`).
Both go through :func:`evaluate` (``ce``) or, for every loss, :func:`evaluate_loss`: forward
passes of ``batch_size`` examples without a graph, the summed loss accumulated in float64.

>>> import torch
>>> from torch import nn
>>> model = nn.Linear(2, 2)
>>> x, y = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
>>> loss, acc = evaluate(model, x, y, batch_size=2)
>>> 0 <= acc <= 1 and loss > 0
True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatcli.curvature.losses import IGNORE_INDEX, normalized_cross_entropy
from flatcli.data.splits import iter_batches
from flatcli.errors import UsageError

__all__ = ["EVAL_BATCH_SIZE", "evaluate", "evaluate_loss", "has_accuracy"]

EVAL_BATCH_SIZE = 1024
"""Examples per forward when evaluating (no graph is kept, so larger than a training batch)."""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = EVAL_BATCH_SIZE,
    *,
    head_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in eval mode, no augmentation.

    Args:
        model: maps ``x`` (B, ...) to logits (B, K); its train/eval mode is restored afterwards.
        x: inputs (N, ...) on the model's device and dtype.
        y: int64 labels (N,).
        batch_size: examples per forward.
        head_dtype: dtype the cross-entropy is computed in (None: the logits' dtype). Either
            way each batch's summed loss is added up in float64.

    Returns:
        ``(mean loss, accuracy)``; ``(0.0, 0.0)`` for no examples.
    """
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for xb, yb in iter_batches((x, y), batch_size):
        logits = model(xb)
        head = logits if head_dtype is None else logits.to(head_dtype)
        loss += F.cross_entropy(head, yb, reduction="sum").double()
        correct += (logits.argmax(-1) == yb).sum()
    model.train(was_training)
    n = max(int(x.shape[0]), 1)
    return float(loss) / n, int(correct) / n


def has_accuracy(loss: str, y: Tensor) -> bool:
    """Whether an accuracy means something for ``loss`` on targets ``y``: not for ``mse``, for
    ``bce`` only when every target is 0 or 1, always for the class and token losses."""
    if loss == "mse":
        return False
    if loss == "bce":
        return bool(((y == 0) | (y == 1)).all())
    return True


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: str = "ce",
    batch_size: int = EVAL_BATCH_SIZE,
    *,
    head_dtype: torch.dtype | None = None,
) -> tuple[float, float | None]:
    """Mean ``loss`` and accuracy of ``model`` on ``(x, y)`` in eval mode: the numbers
    ``flatcli train`` records (:mod:`flatcli.train.objective`) and ``rank --evaluate`` measures.

    ``ce``: :func:`evaluate`; ``token-ce``: the mean over all counted positions (target != -100)
    and the token accuracy over them; ``nsce``: its mean and the argmax accuracy; ``mse``: the
    mean over examples and outputs, no accuracy (None); ``bce``: the mean over examples and
    outputs and, when every target is 0 or 1, the fraction of outputs on the right side of 0
    (else None). Summed losses are added up in float64.

    Args:
        model: maps ``x`` (B, ...) to the loss's outputs; its train/eval mode is restored.
        x: inputs (N, ...) on the model's device (float inputs in its dtype; token ids int64).
        y: targets (N, ...) as ``loss`` takes them.
        loss: ``ce``, ``nsce``, ``token-ce``, ``mse`` or ``bce``.
        batch_size: examples per forward.
        head_dtype: dtype the outputs are cast to before the loss (None: their own).

    Returns:
        ``(mean loss, accuracy or None)``.

    >>> m = nn.Linear(2, 3)
    >>> x, y = torch.randn(4, 2), torch.rand(4, 3)
    >>> mean, acc = evaluate_loss(m, x, y, "mse", head_dtype=torch.float64)
    >>> abs(mean - F.mse_loss(m(x).double(), y.double()).item()) < 1e-12, acc
    (True, None)
    """
    if loss == "ce":
        return evaluate(model, x, y, batch_size, head_dtype=head_dtype)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    count = 0
    for xb, yb in iter_batches((x, y), batch_size):
        out = model(xb)
        if head_dtype is not None:
            out = out.to(head_dtype)
        if loss == "token-ce":
            flat, targets = out.reshape(-1, out.shape[-1]), yb.reshape(-1)
            counted = targets != IGNORE_INDEX
            total += F.cross_entropy(
                flat, targets, ignore_index=IGNORE_INDEX, reduction="sum"
            ).double()
            correct += ((flat.argmax(-1) == targets) & counted).sum().double()
            count += int(counted.sum())
        elif loss == "nsce":
            total += normalized_cross_entropy(out, yb).sum().double()
            correct += (out.argmax(-1) == yb).sum().double()
            count += int(yb.shape[0])
        elif loss in ("mse", "bce"):
            target = yb.to(out.dtype)
            if loss == "mse":
                total += F.mse_loss(out, target, reduction="sum").double()
            else:
                total += F.binary_cross_entropy_with_logits(out, target, reduction="sum").double()
                correct += ((out > 0) == (target > 0.5)).sum().double()
            count += int(target.numel())
        else:
            raise UsageError(f"cannot evaluate loss {loss!r}")
    model.train(was_training)
    count = max(count, 1)
    accuracy = float(correct) / count if has_accuracy(loss, y) else None
    return float(total) / count, accuracy
