"""Model size: parameters and MACs (multiply-accumulates of Conv and Linear layers, one image, batch 1)."""

from __future__ import annotations

import torch
import torch.nn as nn

MACS_CONVENTION = "multiply-accumulates of Conv2d and Linear layers for one image (1 MAC = 1 multiply + 1 add)"


def architecture_size(name: str, num_classes: int | None = None) -> tuple[int, int | None]:
    """Parameters and MACs of an architecture at its own input size, with num_classes classes (None: the
    architecture's default). Built on PyTorch's meta device: shapes without memory or arithmetic, so listing large
    models stays fast. None for MACs where they cannot be counted this way: a generator (its input is a latent
    vector) or a model with an operation the meta device lacks."""
    from ..models import create_model, get_entry

    entry = get_entry(name)
    with torch.device("meta"):
        model = create_model(name, **({"num_classes": num_classes} if num_classes and not entry.is_generator else {}))
    if entry.is_generator:
        return count_parameters(model), None
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    try:
        return count_parameters(model), count_macs(model, (channels, *entry.input_size))
    except (NotImplementedError, RuntimeError):
        return count_parameters(model), None


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
        model(torch.zeros(1, *sample_shape, device=next(model.parameters()).device))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return total
