"""Helpers shared by the model families: argument checks, activations, initialisation."""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn


class Activation(str, Enum):
    """Activation functions the small models (mlp, lenet5) offer; never in place."""

    RELU = "relu"
    TANH = "tanh"
    SOFTPLUS = "softplus"


def make_activation(activation: str | Activation) -> nn.Module:
    """A fresh, not-in-place activation module for ``activation`` ("relu", "tanh", "softplus")."""
    try:
        kind = Activation(activation)
    except ValueError:
        choices = ", ".join(a.value for a in Activation)
        raise ValueError(f"activation must be one of {choices}. Got {activation!r}.") from None
    return {Activation.RELU: nn.ReLU, Activation.TANH: nn.Tanh, Activation.SOFTPLUS: nn.Softplus}[
        kind
    ]()


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum``; else a ValueError that quotes it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}. Got {value!r}.")
    return value


def check_prob(name: str, value: object) -> float:
    """``value`` as a float if it lies in [0, 1); else a ValueError that quotes it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1). Got {value!r}.")
    return float(value)


def default_input_size(in_channels: int) -> int:
    """Side of the square input a model expects by default: 28 (MNIST) for 1 channel, else 32."""
    return 28 if in_channels == 1 else 32


def check_min_size(model: str, x: torch.Tensor, min_size: int) -> None:
    """Refuse an input whose height or width is below ``min_size`` with a message that says why."""
    if x.dim() < 3 or min(x.shape[-2:]) < min_size:
        raise ValueError(
            f"{model} needs inputs of shape (N, C, H, W) with H, W >= {min_size}; "
            f"got {tuple(x.shape)}. Pad smaller images (e.g. MNIST to 32x32)."
        )


def he_init(model: nn.Module) -> None:
    """He et al. (2015) normal init of every conv (fan_out, as the ResNet/WRN/DenseNet code).

    Conv biases become 0, BatchNorm affine parameters 1 and 0; linear layers keep PyTorch's
    default initialisation and a zero bias.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
