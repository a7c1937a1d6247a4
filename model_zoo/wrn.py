"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis 2016) for CIFAR-sized inputs."""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_int, check_prob, he_init
from .registry import register_model


class WideBlock(nn.Module):
    """Pre-activation block B(3,3): conv3x3(relu(bn(x))) -> [dropout] -> conv3x3(relu(bn(.))).

    Where the width or stride changes, the shortcut is a 1x1 convolution of the
    pre-activated input (as the authors' code); elsewhere it is the identity.
    """

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.equal = cin == cout and stride == 1
        self.shortcut = (
            nn.Identity() if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.dropout(self.act2(self.bn2(self.conv1(pre)))))
        return out + self.shortcut(x if self.equal else pre)


class WideResNet(nn.Module):
    """conv3x3(16), 3 groups of N blocks (16k, 32k, 64k channels; stride 1, 2, 2), BN, ReLU,
    global average pooling, linear head."""

    def __init__(
        self, depth: int, widen_factor: int, in_channels: int, num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups, cin = [], 16
        for cout, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = [WideBlock(cin, cout, stride, dropout)]
            blocks += [WideBlock(cout, cout, 1, dropout) for _ in range(n - 1)]
            groups.append(nn.Sequential(*blocks))
            cin = cout
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(cin)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        x = self.conv1(x)  # (N, 16, H, W)
        x = self.block3(self.block2(self.block1(x)))  # (N, 64k, H/4, W/4)
        x = self.act(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("wrn")
def wrn(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    depth: int = 28,
    widen_factor: int = 2,
    dropout: float = 0.0,
) -> WideResNet:
    """Wide ResNet WRN-depth-k with pre-activation B(3,3) blocks; default WRN-28-2.

    Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016): (depth-4)/6 blocks per
    group, widths 16k, 32k, 64k. WRN-28-2 (the network of Jia & Su's gamma paper) has
    1,467,610 parameters on CIFAR-10 (quoted 1.47M); WRN-16-4 2,748,890 (quoted 2.7M).
    Size-agnostic (global pooling): works on 1x28x28 too.

    Args:
        num_classes: outputs of the classifier.
        in_channels: input channels (3 for CIFAR, 1 for MNIST).
        depth: 6N+4 (10, 16, 22, 28, 40, ...).
        widen_factor: k, the width multiplier.
        dropout: dropout probability between the two convolutions of each block (the paper
            uses 0.3 in some runs); 0 adds no dropout module. With dropout > 0, per-example
            transforms in train mode need ``torch.func.vmap(..., randomness="different")``.
    """
    depth = check_int("depth", depth, minimum=10)
    if (depth - 4) % 6:
        raise ValueError(f"depth must be 6N+4 (10, 16, 22, 28, 40, ...). Got {depth}.")
    return WideResNet(
        depth,
        check_int("widen_factor", widen_factor),
        check_int("in_channels", in_channels),
        check_int("num_classes", num_classes),
        check_prob("dropout", dropout),
    )
