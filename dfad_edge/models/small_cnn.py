"""Small CNNs for tiny images such as scikit-learn's 8x8 digits."""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """conv-conv-pool-conv, global average pool, linear. BatchNorm everywhere so its statistics can guide a generator."""

    def __init__(self, width: int, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 4 * width),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("digits_cnn", (8, 8), "small CNN for 8x8 digits (teacher size, width 32)")
def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return SmallCNN(32, num_classes, in_channels)


@register_model("digits_cnn_medium", (8, 8), "small CNN for tiny images (student size, width 16)")
def digits_cnn_medium(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return SmallCNN(16, num_classes, in_channels)


@register_model("digits_cnn_small", (8, 8), "small CNN for 8x8 digits (student size, width 8)")
def digits_cnn_small(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return SmallCNN(8, num_classes, in_channels)
