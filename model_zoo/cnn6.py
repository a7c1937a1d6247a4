"""The plain 6-layer CNN of the Fisher-determinant (gamma) paper."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ._common import check_int, he_init
from .registry import register_model

_WIDTHS = (64, 64, 128, 128, 192, 192)


class CNN6(nn.Sequential):
    """Six 3x3 convs (64, 64, 128, 128, 192, 192), ReLU, 2x2 max-pool after conv2 and conv4,
    global average pooling, linear head. Any input of at least 4x4 works."""

    def __init__(self, in_channels: int, num_classes: int, batchnorm: bool) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_channels
        for i, out in enumerate(_WIDTHS, start=1):
            layers[f"conv{i}"] = nn.Conv2d(width, out, 3, padding=1, bias=not batchnorm)
            if batchnorm:
                layers[f"bn{i}"] = nn.BatchNorm2d(out)
            layers[f"act{i}"] = nn.ReLU()
            if i in (2, 4):
                layers[f"pool{i // 2}"] = nn.MaxPool2d(2)  # halves H and W
            width = out
        layers["gap"] = nn.AdaptiveAvgPool2d(1)  # (N, 192, 1, 1)
        layers["flatten"] = nn.Flatten()  # (N, 192)
        layers["fc"] = nn.Linear(width, num_classes)
        super().__init__(layers)
        he_init(self)


@register_model("cnn6")
def cnn6(*, num_classes: int = 10, in_channels: int = 3, batchnorm: bool = False) -> CNN6:
    """Plain 6-layer CNN: 3x3 convs of 64, 64, 128, 128, 192, 192 filters (padding 1), ReLU,
    2x2 max pooling after conv2 and conv4, global average pooling, linear classifier.

    Jia & Su, "Information-Theoretic Local Minima Characterization and Regularization"
    (ICML 2020), Appendix E ("similar to the baseline in Lee et al. (2016) yet without the
    mlpconv layers"). The paper names no normalisation, so by default there is none;
    convolutions have biases and He (fan-out) initialisation, as the paper's training details
    say. 815,434 parameters on CIFAR-10, 814,282 on MNIST. Size-agnostic (global pooling):
    works on 1x28x28 as well as 3x32x32.

    Args:
        num_classes: outputs of the classifier.
        in_channels: input channels (3 for CIFAR, 1 for MNIST).
        batchnorm: not in the paper: add BatchNorm2d after each conv (before the ReLU) and
            drop the conv biases.
    """
    return CNN6(
        check_int("in_channels", in_channels),
        check_int("num_classes", num_classes),
        bool(batchnorm),
    )
