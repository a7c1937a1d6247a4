"""DenseNet-BC (Huang et al. 2017) for CIFAR-sized inputs."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import check_int, check_prob, he_init
from .registry import register_model


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k) [dropout]; its k new maps join the input."""

    def __init__(self, cin: int, growth_rate: int, dropout: float) -> None:
        super().__init__()
        inter = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.act2 = nn.ReLU()
        self.conv2 = nn.Conv2d(inter, growth_rate, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, c, H, W) -> (N, c + k, H, W)
        out = self.conv1(self.act1(self.bn1(x)))
        out = self.dropout(self.conv2(self.act2(self.bn2(out))))
        return torch.cat([x, out], dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1(compressed width) [dropout] - 2x2 average pooling."""

    def __init__(self, cin: int, cout: int, dropout: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.pool = nn.AvgPool2d(2)


class DenseNetBC(nn.Module):
    """conv3x3(2k), dense block, transition, dense block, transition, dense block, BN, ReLU,
    global average pooling, linear head."""

    def __init__(
        self,
        depth: int,
        growth_rate: int,
        compression: float,
        in_channels: int,
        num_classes: int,
        dropout: float,
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6  # bottleneck layers per block (two convolutions each)
        width = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        for b in (1, 2, 3):
            layers = []
            for _ in range(n):
                layers.append(Bottleneck(width, growth_rate, dropout))
                width += growth_rate
            self.add_module(f"block{b}", nn.Sequential(*layers))
            if b < 3:
                out = math.floor(width * compression)
                self.add_module(f"trans{b}", Transition(width, out, dropout))
                width = out
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        x = self.conv1(x)  # (N, 2k, H, W)
        x = self.trans1(self.block1(x))  # (N, ., H/2, W/2)
        x = self.trans2(self.block2(x))  # (N, ., H/4, W/4)
        x = self.act(self.bn(self.block3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("densenet-bc")
def densenet_bc(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
    dropout: float = 0.0,
) -> DenseNetBC:
    """DenseNet-BC (bottleneck + compression); default depth 100, growth rate k=12.

    Huang, Liu, van der Maaten & Weinberger, "Densely Connected Convolutional Networks"
    (CVPR 2017), Section 3 and Table 2: three dense blocks of (depth-4)/6 bottleneck layers,
    transitions that compress the width by ``compression``. DenseNet-BC (L=100, k=12) has
    769,162 parameters on CIFAR-10 (the paper quotes 0.8M); it is the "DenseNet-BC-k=12" of
    Jia & Su's gamma paper. Size-agnostic (global pooling): works on 1x28x28 too.

    Args:
        num_classes: outputs of the classifier.
        in_channels: input channels (3 for CIFAR, 1 for MNIST).
        depth: 6n+4 (40, 100, 190, ...); n bottleneck layers per dense block.
        growth_rate: k, the feature maps each layer adds.
        compression: theta in (0, 1]: a transition keeps floor(theta * width) maps.
        dropout: dropout after each convolution but the first (the paper uses 0.2 without
            data augmentation); 0 adds no dropout module.
    """
    depth = check_int("depth", depth, minimum=10)
    if (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4 (40, 100, 190, ...). Got {depth}.")
    if (
        isinstance(compression, bool)
        or not isinstance(compression, (int, float))
        or not (0 < compression <= 1)
    ):
        raise ValueError(f"compression must be a number in (0, 1]. Got {compression!r}.")
    return DenseNetBC(
        depth,
        check_int("growth_rate", growth_rate),
        float(compression),
        check_int("in_channels", in_channels),
        check_int("num_classes", num_classes),
        check_prob("dropout", dropout),
    )
