"""ResNet for CIFAR (He et al. 2016): 6n+2 layers in three stages of 16, 32 and 64 channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_int, he_init
from .registry import register_model


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride``, zero-pad the new channels; no parameters."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        front = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, front, self.extra_channels - front))


def _shortcut(cin: int, cout: int, stride: int, kind: str) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(cout - cin, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Post-activation block (He et al. 2016a): relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride, shortcut)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016b): conv(relu(bn(conv(relu(bn(x)))))) + shortcut.

    A projection shortcut (option B) reads the pre-activated input, as in the paper's code.
    """

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = nn.ReLU()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = _shortcut(cin, cout, stride, shortcut)
        self.projects = isinstance(self.shortcut, nn.Sequential)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        return out + self.shortcut(pre if self.projects else x)


class CifarResNet(nn.Module):
    """conv3x3(16) [bn, relu], 3 stages of n blocks (16, 32, 64 channels; stride 1, 2, 2),
    [bn, relu if pre-activation], global average pooling, linear head."""

    def __init__(
        self, n: int, in_channels: int, num_classes: int, shortcut: str, preact: bool
    ) -> None:
        super().__init__()
        block = PreActBlock if preact else BasicBlock
        self.conv1 = _conv3x3(in_channels, 16)
        # post-activation nets normalise the stem; pre-activation nets normalise after the stages
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(16)
        self.act1 = nn.Identity() if preact else nn.ReLU()
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [block(cin, cout, stride, shortcut)]
            blocks += [block(cout, cout, 1, shortcut) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = nn.BatchNorm2d(64) if preact else nn.Identity()
        self.act_final = nn.ReLU() if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        x = self.act1(self.bn1(self.conv1(x)))  # (N, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, H/4, W/4)
        x = self.act_final(self.bn_final(x))
        return self.fc(torch.flatten(self.pool(x), 1))  # (N, 64) -> (N, num_classes)


@register_model("resnet20")
def resnet20(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    depth: int = 20,
    shortcut: str = "A",
    preact: bool = False,
) -> CifarResNet:
    """ResNet-20 for CIFAR: 3 stages of 3 basic blocks with 16, 32 and 64 channels.

    He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016),
    Section 4.2: 6n+2 layers; the paper's CIFAR nets use option A shortcuts (identity,
    subsampled, the new channels zero-padded: no parameters), giving 0.27M parameters
    (272,474 for ResNet-20 on CIFAR-10). Jia & Su's gamma paper (Appendix E) trains the
    pre-activation form (He et al., "Identity Mappings in Deep Residual Networks", ECCV
    2016): ``preact=True``. Size-agnostic (global pooling): works on 1x28x28 too.

    Args:
        num_classes: outputs of the classifier.
        in_channels: input channels (3 for CIFAR, 1 for MNIST).
        depth: 6n+2 (20, 32, 44, 56, 110, ...); n blocks per stage.
        shortcut: "A" (zero-padding identity, the paper's CIFAR choice) or "B" (1x1
            convolution + BatchNorm where the shape changes).
        preact: pre-activation blocks (BN-ReLU-conv) and a final BN-ReLU before pooling.
    """
    depth = check_int("depth", depth, minimum=8)
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...). Got {depth}.")
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut must be 'A' or 'B'. Got {shortcut!r}.")
    return CifarResNet(
        (depth - 2) // 6,
        check_int("in_channels", in_channels),
        check_int("num_classes", num_classes),
        shortcut,
        bool(preact),
    )
