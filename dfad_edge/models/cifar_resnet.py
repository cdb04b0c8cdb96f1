"""Classic CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, n BasicBlocks each.

The "option A" shortcut has no parameters (stride-2 subsampling plus zero channel padding), so the
widely shared CIFAR-10 ResNet-20/32/44/56 checkpoints load with their parameter names unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import BasicBlock
from .registry import register_model


class PadShortcut(nn.Module):
    """Option A: subsample spatially and zero-pad the missing channels; no parameters."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


def option_a_block(in_planes: int, planes: int, stride: int) -> BasicBlock:
    needs_projection = stride != 1 or in_planes != planes
    return BasicBlock(in_planes, planes, stride, PadShortcut(planes - in_planes) if needs_projection else nn.Identity())


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, count: int, stride: int) -> nn.Sequential:
        blocks = [option_a_block(in_planes, planes, stride)]
        blocks += [option_a_block(planes, planes, 1) for _ in range(count - 1)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(out)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        # Adaptive pooling equals the original 8x8 pool at 32x32 and also works at other sizes.
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _make(depth: int):
    blocks = (depth - 2) // 6

    @register_model(f"resnet{depth}", (32, 32), f"CIFAR ResNet-{depth}, option-A shortcut")
    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(blocks, num_classes, in_channels)

    return build


resnet20, resnet32, resnet44, resnet56 = (_make(d) for d in (20, 32, 44, 56))
