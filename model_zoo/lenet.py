"""LeNet-5 (LeCun et al. 1998) and its BatchNorm variant from the K-FAC Hessian paper."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._common import Activation, check_int, default_input_size, make_activation
from .registry import register_model


class LeNet5(nn.Sequential):
    """conv1-5x5(6), pool, conv2-5x5(16), pool, fc1(120), fc2(84), fc3; max pooling.

    The first convolution pads a 28x28 input by 2 so that both MNIST and CIFAR inputs reach
    conv2 as 6x14x14 and fc1 as 16x5x5 = 400 features. With ``batchnorm`` a
    ``BatchNorm(affine=False)`` follows each ReLU (K-FAC paper, Table 5).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        input_size: int,
        activation: str | Activation,
        batchnorm: bool,
    ) -> None:
        def act_bn(i: int, channels: int, bn: type[nn.Module]) -> OrderedDict[str, nn.Module]:
            out: OrderedDict[str, nn.Module] = OrderedDict({f"act{i}": make_activation(activation)})
            if batchnorm:
                out[f"bn{i}"] = bn(channels, affine=False)
            return out

        pad = (32 - input_size) // 2
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv1"] = nn.Conv2d(in_channels, 6, 5, padding=pad)  # (6, 28, 28)
        layers.update(act_bn(1, 6, nn.BatchNorm2d))
        layers["pool1"] = nn.MaxPool2d(2)  # (6, 14, 14)
        layers["conv2"] = nn.Conv2d(6, 16, 5)  # (16, 10, 10)
        layers.update(act_bn(2, 16, nn.BatchNorm2d))
        layers["pool2"] = nn.MaxPool2d(2)  # (16, 5, 5)
        layers["flatten"] = nn.Flatten()  # 400
        layers["fc1"] = nn.Linear(16 * 5 * 5, 120)
        layers.update(act_bn(3, 120, nn.BatchNorm1d))
        layers["fc2"] = nn.Linear(120, 84)
        layers.update(act_bn(4, 84, nn.BatchNorm1d))
        layers["fc3"] = nn.Linear(84, num_classes)
        super().__init__(layers)
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, s, s) -> (N, num_classes)
        s = self.input_size
        if x.dim() != 4 or tuple(x.shape[-2:]) != (s, s):
            raise ValueError(
                f"this LeNet-5 was built for (N, C, {s}, {s}) inputs; got {tuple(x.shape)}. "
                "Build it with input_size=28 (MNIST) or input_size=32 (CIFAR)."
            )
        return super().forward(x)


def _lenet5(
    num_classes: int,
    in_channels: int,
    input_size: int | None,
    activation: str,
    batchnorm: bool,
) -> LeNet5:
    num_classes = check_int("num_classes", num_classes)
    in_channels = check_int("in_channels", in_channels)
    if input_size is None:
        input_size = default_input_size(in_channels)
    if input_size not in (28, 32):
        raise ValueError(
            "input_size must be 28 (MNIST: the first conv pads by 2) or 32 (CIFAR: no padding). "
            f"Got {input_size!r}."
        )
    return LeNet5(in_channels, num_classes, input_size, activation, batchnorm)


@register_model("lenet5")
def lenet5(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | None = None,
    activation: str = "relu",
) -> LeNet5:
    """LeNet-5: conv6-5x5, max-pool, conv16-5x5, max-pool, fc120, fc84, fc; ReLU.

    LeCun et al., "Gradient-based learning applied to document recognition" (1998), in the
    modern form of Wu et al., "Dissecting Hessian" (K-FAC paper, arXiv:2010.04261), Table 4.
    On MNIST (1x28x28) it has 61,706 parameters; on CIFAR-10 (3x32x32) 62,006.

    Args:
        num_classes: outputs of fc3.
        in_channels: input channels (1 for MNIST, 3 for CIFAR).
        input_size: side of the square input: 28 pads the first convolution by 2, 32 does
            not pad (the paper's CIFAR-10 table). Default: 28 when ``in_channels == 1``,
            else 32. Other sizes are refused.
        activation: "relu" (the paper's), "tanh" or "softplus".
    """
    return _lenet5(num_classes, in_channels, input_size, activation, batchnorm=False)


@register_model("lenet5-bn")
def lenet5_bn(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | None = None,
    activation: str = "relu",
) -> LeNet5:
    """LeNet5-BN: LeNet-5 with a BatchNorm without affine parameters after every ReLU.

    Wu et al., "Dissecting Hessian" (K-FAC paper, arXiv:2010.04261), Table 5 and Appendix B:
    BatchNorm2d/1d(affine=False) after the ReLU of conv1, conv2, fc1 and fc2, before the
    pooling. In eval mode each BatchNorm is a fixed affine map of its input, so the Hessian is
    well defined. Same parameter count as ``lenet5`` (61,706 on MNIST, 62,006 on CIFAR-10).

    Args:
        num_classes: outputs of fc3.
        in_channels: input channels (1 for MNIST, 3 for CIFAR).
        input_size: 28 (first convolution padded by 2) or 32 (no padding). Default: 28 when
            ``in_channels == 1``, else 32.
        activation: "relu" (the paper's), "tanh" or "softplus".
    """
    return _lenet5(num_classes, in_channels, input_size, activation, batchnorm=True)
