"""Fully connected networks F-n^m (m hidden layers of n units), as in the K-FAC Hessian paper."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ._common import Activation, check_int, default_input_size, make_activation
from .registry import register_model


class MLP(nn.Sequential):
    """Flatten, then ``fc1, act1[, bn1], ..., fc{m+1}``; layer names follow the K-FAC paper."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        activation: str | Activation,
        batchnorm: bool,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = in_features
        for i, units in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, units)
            layers[f"act{i}"] = make_activation(activation)
            if batchnorm:  # after the activation, no affine parameters (K-FAC paper, App. B)
                layers[f"bn{i}"] = nn.BatchNorm1d(units, affine=False)
            width = units
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(width, num_classes)
        super().__init__(layers)
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (N, num_classes)
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(
                f"mlp expects inputs (N, ...) with {self.in_features} features per example; "
                f"got shape {tuple(x.shape)}"
            )
        return super().forward(x)


@register_model("mlp")
def mlp(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_shape: Sequence[int] | None = None,
    in_features: int | None = None,
    hidden: Sequence[int] = (200, 200),
    activation: str = "relu",
    batchnorm: bool = False,
) -> MLP:
    """Fully connected network F-n^m that flattens its input.

    The default, F-200^2 (784-200-200-10, 199,210 parameters), is the network of Table 3 of
    Wu et al., "Dissecting Hessian: Understanding Common Structure of Hessian in Neural
    Networks" (the K-FAC Hessian paper, arXiv:2010.04261). Layers are named ``fc1``,
    ``act1``, ``fc2``, ... as in that table.

    Args:
        num_classes: outputs of the last layer.
        in_channels: channels of the default input shape: 1 -> (1, 28, 28) (MNIST),
            otherwise (in_channels, 32, 32) (CIFAR). Ignored when ``input_shape`` or
            ``in_features`` is given.
        input_shape: shape of one example, e.g. ``(3, 32, 32)``; the input size is its product.
        in_features: input size; overrides ``input_shape`` (they must agree if both are given).
        hidden: units of each hidden layer, e.g. ``(32, 32)``; empty gives a linear model.
        activation: "relu", "tanh" or "softplus" (smooth activations make the Hessian differ
            from the Gauss-Newton matrix on the diagonal).
        batchnorm: add ``BatchNorm1d(affine=False)`` after each activation (the paper's
            "F-200^2-BN", Appendix B).
    """
    num_classes = check_int("num_classes", num_classes)
    in_channels = check_int("in_channels", in_channels)
    from_shape = None
    if input_shape is not None:
        shape = tuple(input_shape)
        for d in shape:
            check_int("input_shape entries", d)
        from_shape = math.prod(shape)
    if in_features is not None:
        in_features = check_int("in_features", in_features)
        if from_shape is not None and from_shape != in_features:
            raise ValueError(
                f"in_features={in_features} disagrees with input_shape={tuple(input_shape)} "
                f"({from_shape} features)"
            )
    elif from_shape is not None:
        in_features = from_shape
    else:
        in_features = in_channels * default_input_size(in_channels) ** 2
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise ValueError(f"hidden must be a list of layer widths. Got {hidden!r}.")
    hidden = [check_int("hidden widths", h) for h in hidden]
    return MLP(in_features, hidden, num_classes, activation, bool(batchnorm))
