"""Accuracy and mean loss of a model on a set of examples: the one evaluation loop.

Training evaluates after each epoch (:func:`flatcli.train.fit`); ``rank --evaluate`` measures
each checkpoint's train and test numbers (:func:`flatcli.rank.sweep.evaluate_generalization`).
Both go through :func:`evaluate`: forward passes of ``batch_size`` examples without a graph, the
summed cross-entropy accumulated in float64.

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

from flatcli.data.splits import iter_batches

__all__ = ["EVAL_BATCH_SIZE", "evaluate"]

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
