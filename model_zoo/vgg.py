"""VGG-11 (Simonyan & Zisserman 2015, configuration A) adapted to 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_int, check_min_size
from .registry import register_model

# channels of each 3x3 conv; "M" is a 2x2 max pooling
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """``features`` (the conv stack), global average pooling, one linear layer 512 -> classes."""

    def __init__(self, config: tuple, in_channels: int, num_classes: int, batchnorm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(width, v, 3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU())
            width = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # 1x1 already for 32x32 inputs
        self.classifier = nn.Linear(width, num_classes)
        self.min_size = 2 ** config.count("M")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        check_min_size("vgg11", x, self.min_size)
        x = self.pool(self.features(x))  # (N, 512, 1, 1)
        return self.classifier(torch.flatten(x, 1))


@register_model("vgg11")
def vgg11(*, num_classes: int = 10, in_channels: int = 3, batchnorm: bool = True) -> VGG:
    """VGG-11 for CIFAR: the eight-conv stack of VGG configuration A, then 512 -> num_classes.

    Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
    (ICLR 2015), configuration A, adapted to 3x32x32 as in Wu et al., "Dissecting Hessian"
    (K-FAC paper, Appendix B): the convolutions unchanged, the three fully connected layers
    replaced by one linear layer with 512 inputs. By default each conv is followed by
    BatchNorm2d (with affine parameters) before its ReLU, as the usual CIFAR VGG-11
    (9,231,114 parameters on CIFAR-10); ``batchnorm=False`` gives the K-FAC paper's plain
    network (9,225,610 parameters). Five 2x2 poolings need H, W >= 32: pad MNIST to 32x32
    (28x28 inputs are refused with a message that says so).

    Args:
        num_classes: outputs of the classifier.
        in_channels: input channels (3 for CIFAR, 1 for padded MNIST).
        batchnorm: BatchNorm2d after every conv (default) or none (the K-FAC paper's VGG11).
    """
    return VGG(
        _VGG11,
        check_int("in_channels", in_channels),
        check_int("num_classes", num_classes),
        bool(batchnorm),
    )
