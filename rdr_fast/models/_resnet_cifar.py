"""CIFAR ResNet-32 (He et al. 2016; the LDAM-DRW / Idelbayev variant) and a tiny CNN."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsample, then zero-pad channels on both sides.
    [N, C, H, W] -> [N, C + 2*pad, H/2, W/2]. No parameters; a real module (not a
    lambda) so whole models pickle."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. Convs have no bias."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # LDAM's option A: pad planes//4 channels per side (16->32: 8+8, 32->64: 16+16).
        needs_proj = stride != 1 or in_planes != planes
        self.shortcut = PadShortcut(planes // 4) if needs_proj else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Stem conv(16) + 3 stages of n BasicBlocks (16/32/64, strides 1/2/2) + avg pool + fc.

    forward(x [N, in_channels, H, W]) -> (features [N, 64], logits [N, num_classes]).
    """

    def __init__(self, num_blocks: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.feat_dim = 64
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, layers = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in [stride] + [1] * (num_blocks - 1):
                blocks.append(BasicBlock(planes, width, s))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        # LDAM's init: kaiming_normal_ (fan_in, gain sqrt 2) on conv and linear weights;
        # linear bias and BN keep PyTorch defaults.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        feats = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return feats, self.fc(feats)


def resnet32(num_classes: int, in_channels: int = 3) -> ResNetCifar:
    """ResNet-32: 3 x 5 BasicBlocks, 31 convs + 1 linear; 464,154 params at C = 10."""
    return ResNetCifar(5, num_classes, in_channels)


class SmallCNN(nn.Module):
    """Three conv3x3-BN-ReLU blocks (32/64/64), 2x2 max-pool after the first two,
    global avg pool, fc. For 8x8 digits and 28x28 Fashion-MNIST; 56,554 params at C = 10.

    forward(x [N, in_channels, H, W]) -> (features [N, 64], logits [N, num_classes]).
    """

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.feat_dim = 64

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]
        # ceil_mode: odd sizes round up (7x7 -> 4x4) and tiny inputs never pool to 0x0.
        self.body = nn.Sequential(*block(in_channels, 32), nn.MaxPool2d(2, ceil_mode=True),
                                  *block(32, 64), nn.MaxPool2d(2, ceil_mode=True),
                                  *block(64, 64))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor):
        feats = F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)
        return feats, self.fc(feats)


def small_cnn(num_classes: int, in_channels: int = 1) -> SmallCNN:
    return SmallCNN(num_classes, in_channels)
