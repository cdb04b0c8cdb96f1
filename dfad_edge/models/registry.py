"""A small model registry: one ``create_model(name, **kwargs)`` entry point, names listed on error."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..errors import DfadError

TORCHVISION_PREFIX = "torchvision."


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int]  # the (height, width) the architecture was designed for
    description: str
    is_generator: bool = False


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, input_size: tuple[int, int], description: str, is_generator: bool = False):
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, builder, input_size, description, is_generator)
        return builder

    return decorator


def list_models(pattern: str = "*", include_torchvision: bool = False) -> list[str]:
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
    if include_torchvision:
        names += [n for n in _torchvision_names() if fnmatch.fnmatch(n, pattern)]
    return names


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return [TORCHVISION_PREFIX + n for n in tvm.list_models(module=tvm)]


def _unknown_model_error(name: str) -> DfadError:
    return DfadError(
        f"unknown architecture '{name}'. Valid names: {', '.join(list_models())}, "
        f"or any torchvision classifier as 'torchvision.<name>' (e.g. torchvision.resnet34)"
    )


def get_entry(name: str) -> ModelEntry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX):]
        if TORCHVISION_PREFIX + tv_name not in _torchvision_names():
            raise _unknown_model_error(name)
        return ModelEntry(name, _torchvision_builder(tv_name), (224, 224), f"torchvision {tv_name}")
    raise _unknown_model_error(name)


def _torchvision_builder(tv_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        import torchvision.models as tvm

        if in_channels != 3:
            raise DfadError(f"torchvision.{tv_name} takes 3-channel images; this data has {in_channels} channel(s)")
        # weights=None: weights come from the user's checkpoint, never from a hub at run time.
        return tvm.get_model(tv_name, weights=None, num_classes=num_classes)

    return build


def create_model(name: str, **kwargs) -> nn.Module:
    entry = get_entry(name)
    try:
        return entry.builder(**kwargs)
    except TypeError as exc:
        raise DfadError(f"architecture '{name}' does not take these arguments {kwargs}: {exc}") from None


def default_input_size(name: str) -> tuple[int, int]:
    return get_entry(name).input_size
