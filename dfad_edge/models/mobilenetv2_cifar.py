"""MobileNetV2 in its CIFAR form: the compact student of the data-free distillation literature at 32x32.

The ImageNet network (Sandler et al. 2018) downsamples 32x before its last layer, which leaves a 1x1 map of a 32x32
image. The CIFAR form keeps its inverted-residual stages and changes two strides: a stride-1 stem and a stride-1
second stage, so a 32x32 image ends as a 4x4 map (downsampling 8x, as in the CIFAR ResNets).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model

# (expansion, output channels, blocks, stride of the first block); the second stage's stride is 1 here, 2 on ImageNet.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS, LAST_CHANNELS = 32, 1280


def make_divisible(channels: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of 8 (as the reference implementation does), never below 90%."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; the input is added back where the shape is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers = [conv_bn_relu6(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.layers = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class MobileNetV2Cifar(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        channels = make_divisible(STEM_CHANNELS * width)
        blocks: list[nn.Module] = [conv_bn_relu6(in_channels, channels, 3)]
        for expansion, out_channels, count, stride in STAGES:
            out_channels = make_divisible(out_channels * width)
            for index in range(count):
                blocks.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expansion))
                channels = out_channels
        # As in the reference: the last layer never narrows below 1280 channels.
        last = make_divisible(LAST_CHANNELS * width) if width > 1.0 else LAST_CHANNELS
        blocks.append(conv_bn_relu6(channels, last, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(last, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _make(name: str, width: float):
    @register_model(name, (32, 32), f"edge student for 32x32: MobileNetV2, CIFAR form (stride-1 stem), width {width}")
    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return MobileNetV2Cifar(width, num_classes, in_channels)

    return build


mobilenetv2_cifar, mobilenetv2_cifar_050 = _make("mobilenetv2_cifar", 1.0), _make("mobilenetv2_cifar_050", 0.5)
