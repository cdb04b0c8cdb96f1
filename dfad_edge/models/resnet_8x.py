"""The CIFAR ResNets used by DFAD ("8x" variants): 3x3 stride-1 stem, no max-pool, widths 64..512.

Parameter names match the published DFAD checkpoints (conv1, bn1, layer{1..4}.{i}.{conv1,bn1,conv2,bn2,
shortcut.0,shortcut.1}, linear), so those load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import BasicBlock
from .registry import register_model


def projection_block(in_planes: int, planes: int, stride: int) -> BasicBlock:
    """A 1x1 conv + BN shortcut where the shape changes (named shortcut.0 / shortcut.1, as in DFAD's checkpoints)."""
    shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
        shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    return BasicBlock(in_planes, planes, stride, shortcut)


class ResNet8x(nn.Module):
    def __init__(self, blocks: list[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._stage(64, blocks[0], 1)
        self.layer2 = self._stage(128, blocks[1], 2)
        self.layer3 = self._stage(256, blocks[2], 2)
        self.layer4 = self._stage(512, blocks[3], 2)
        self.linear = nn.Linear(512, num_classes)

    def _stage(self, planes: int, count: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (count - 1):
            layers.append(projection_block(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        # Adaptive pooling: identical to DFAD's 4x4 pool at 32x32, and valid at other input sizes.
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("resnet18_8x", (32, 32), "student for 32x32 (DFAD's): ResNet-18 at 32x32, BasicBlocks [2,2,2,2], widths 64-512")
def resnet18_8x(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet8x([2, 2, 2, 2], num_classes, in_channels)


@register_model("resnet34_8x", (32, 32), "DFAD teacher: ResNet-34, BasicBlocks [3,4,6,3], widths 64-512")
def resnet34_8x(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet8x([3, 4, 6, 3], num_classes, in_channels)
