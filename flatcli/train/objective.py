"""What ``flatcli train`` minimises and reports for each loss (docs: "Your model", Losses).

``ce`` trains on ``F.cross_entropy`` (with label smoothing) and reports the mean cross-entropy
and the accuracy (:func:`flatcli.evaluation.evaluate`, as before there were other losses).
Evaluation for every loss is :func:`flatcli.evaluation.evaluate_loss`, re-exported here.
The other losses minimise the sample loss every measure takes the curvature of:

- ``nsce``: the mean normalized softmax cross-entropy; accuracy of the argmax.
- ``token-ce``: the cross-entropy of every counted position (target != -100), mean over all
  counted positions of the batch (``F.cross_entropy`` over the flattened tokens); the reported
  accuracy is the token accuracy, the fraction of counted positions whose argmax is the target
  (perplexity is ``exp(loss)``).
- ``mse``: ``F.mse_loss``, mean over examples and outputs; no accuracy (None).
- ``bce``: ``F.binary_cross_entropy_with_logits``, mean over examples and outputs; the accuracy
  is the fraction of outputs whose sign agrees with the target (logit > 0 iff target 1) when
  every target is 0 or 1, else None.

Loss and accuracy are summed in float64 over batches of
:data:`flatcli.evaluation.EVAL_BATCH_SIZE` examples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatcli.curvature.losses import (
    IGNORE_INDEX,
    check_targets,
    infer_loss,
    normalized_cross_entropy,
)
from flatcli.errors import UsageError
from flatcli.evaluation import evaluate_loss, has_accuracy

__all__ = [
    "resolve_train_loss",
    "check_train_options",
    "check_train_targets",
    "has_accuracy",
    "objective",
    "evaluate_loss",
]

_SMOOTHABLE = ("ce", "token-ce")
"""Losses ``--label-smoothing`` applies to (those over a softmax of class or token logits)."""


def resolve_train_loss(loss: str | None, y: Tensor) -> str:
    """``loss`` (a :class:`~flatcli.configs.choices.LossName` value), else the default for the
    training targets ``y``: ``token-ce`` for int (N, T), ``mse`` for float, ``ce`` otherwise."""
    from flatcli.configs.choices import LossName
    from flatcli.errors import choice

    return infer_loss(y) if loss is None else choice(LossName, loss, "loss")


def check_train_options(config: object, loss: str, y: Tensor) -> None:
    """Refuse training options the loss cannot take (UsageError, exit 2, before any work).

    ``config`` is a :class:`~flatcli.train.config.TrainConfig`: ``label_smoothing`` needs
    ``ce`` or ``token-ce``; ``fisher_reg`` (Jia & Su's regulariser, on class labels) needs ``ce``;
    ``target_train_acc`` needs an accuracy (:func:`has_accuracy`).
    """
    if config.label_smoothing and loss not in _SMOOTHABLE:
        raise UsageError(
            f"--label-smoothing applies to the losses ce and token-ce; this run trains on {loss}"
        )
    if config.fisher_reg and loss != "ce":
        raise UsageError(f"--fisher-reg needs loss ce (class labels); this run trains on {loss}")
    if config.target_train_acc is not None and not has_accuracy(loss, y):
        raise UsageError(
            f"--target-train-acc needs an accuracy; loss {loss} on these targets has none "
            "(bce has one only for targets that are all 0 or 1)"
        )


def check_train_targets(model: nn.Module, x: Tensor, y: Tensor, loss: str, which: str) -> None:
    """Refuse targets that do not fit the model's outputs under ``loss`` (UsageError, exit 2).

    Runs the model on two examples in eval mode without a graph (no state changes): class and
    token targets must lie below the number of logits, float targets must have the outputs'
    shape (and lie in [0, 1] for ``bce``).
    """
    if len(y) == 0:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    finally:
        model.train(was_training)
    if loss in ("ce", "nsce"):
        check_targets(loss, None, y)
        if out.ndim != 2:
            raise UsageError(
                f"loss {loss} needs logits of shape (batch, classes); the model returns "
                f"{tuple(out.shape)} (another loss: --loss)"
            )
        labels = y
    else:
        check_targets(loss, out, y[:2])
        check_targets(loss, None, y)  # every target (bce: all in [0, 1])
        if loss != "token-ce":
            return
        labels = y[y != IGNORE_INDEX]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= out.shape[-1]):
        raise UsageError(
            f"{which} labels must lie in [0, {out.shape[-1]}) (the model's outputs); got values "
            f"from {int(labels.min())} to {int(labels.max())}. Check num_classes."
        )


def objective(loss: str, out: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The mean loss of a batch that training minimises (see the module)."""
    if loss == "ce":
        return F.cross_entropy(out, y, label_smoothing=label_smoothing)
    if loss == "nsce":
        return normalized_cross_entropy(out, y).mean()
    if loss == "token-ce":
        return F.cross_entropy(
            out.reshape(-1, out.shape[-1]),
            y.reshape(-1),
            ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing,
        )
    if loss == "mse":
        return F.mse_loss(out, y.to(out.dtype))
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(out, y.to(out.dtype))
    raise UsageError(f"flatcli train cannot minimise loss {loss!r}")
