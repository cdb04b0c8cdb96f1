"""Model size: parameters and MACs (multiply-accumulates of Conv and Linear layers, one image, batch 1)."""

from __future__ import annotations

import torch
import torch.nn as nn

MACS_CONVENTION = "multiply-accumulates of Conv2d and Linear layers for one image (1 MAC = 1 multiply + 1 add)"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, sample_shape: tuple[int, ...]) -> int:
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output.numel() * kernel

    def linear_hook(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        model(torch.zeros(1, *sample_shape))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return total
