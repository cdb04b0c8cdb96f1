"""A small model registry: one ``create_model(name, **kwargs)`` entry point, names listed on error.

Besides dfad-edge's own architectures, ``torchvision.<name>`` and ``timm.<name>`` (the optional timm extra) name the
classifiers of those libraries, always built without weights: weights come from the user's checkpoint, never from a hub
at run time. What a library records about its pretrained weights' input (size, mean, std, crop) is offline metadata,
and becomes the default for a checkpoint imported with such an architecture.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..errors import DfadError

TORCHVISION_PREFIX = "torchvision."
TIMM_PREFIX = "timm."
TIMM_MISSING = "timm architectures need the timm extra: pip install 'dfad-edge[timm]'"
DEFAULT_CROP_PCT = 0.875  # 224 of 256: the ImageNet evaluation crop of torchvision and most timm weights


@dataclass(frozen=True)
class PretrainedInput:
    """How a model library's pretrained weights expect images; a user's fine-tuned copy usually keeps this."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float  # evaluation: resize the shorter side to size / crop_pct, then take the centre
    interpolation: str = "bilinear"  # of that resize: the library's, e.g. bicubic for many timm weights


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int]  # the (height, width) the architecture was designed for
    description: str
    is_generator: bool = False
    pretrained: PretrainedInput | None = None  # None: the architecture carries no normalisation of its own
    fixed_input_size: bool = False  # built for one input size (ViT-style position embeddings): pass img_size


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, input_size: tuple[int, int], description: str, is_generator: bool = False):
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, builder, input_size, description, is_generator)
        return builder

    return decorator


def list_models(pattern: str = "*", include_torchvision: bool = False, include_timm: bool = False) -> list[str]:
    """Registered names matching the glob; library names match it with or without their prefix."""
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
    if include_torchvision:
        names += [n for n in _torchvision_names() if _matches(n, TORCHVISION_PREFIX, pattern)]
    if include_timm:
        bare_pattern = pattern[len(TIMM_PREFIX):] if pattern.startswith(TIMM_PREFIX) else pattern
        names += [TIMM_PREFIX + n for n in import_timm().list_models(bare_pattern)]
    return names


def _matches(name: str, prefix: str, pattern: str) -> bool:
    return fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(name[len(prefix):], pattern)


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return [TORCHVISION_PREFIX + n for n in tvm.list_models(module=tvm)]


def import_timm():
    """timm, imported only when a timm architecture is asked for."""
    try:
        import timm
    except ImportError:
        raise DfadError(TIMM_MISSING) from None
    return timm


def _unknown_model_error(name: str) -> DfadError:
    return DfadError(
        f"unknown architecture '{name}'. Valid names: {', '.join(list_models())}, "
        f"or any torchvision classifier as 'torchvision.<name>' (e.g. torchvision.resnet34), "
        f"or any timm model as 'timm.<name>' (e.g. timm.resnet18; dfad-edge models --timm 'PATTERN' lists them)"
    )


def get_entry(name: str) -> ModelEntry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_entry(name)
    if name.startswith(TIMM_PREFIX):
        return _timm_entry(name)
    raise _unknown_model_error(name)


def _torchvision_entry(name: str) -> ModelEntry:
    import torchvision.models as tvm

    tv_name = name[len(TORCHVISION_PREFIX):]
    if name not in _torchvision_names():
        raise _unknown_model_error(name)
    # The default weights' evaluation transform (offline metadata): crop size, resize size, mean and std.
    transform = tvm.get_model_weights(tv_name).DEFAULT.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    pretrained = PretrainedInput(tuple(transform.mean), tuple(transform.std), crop / resize,
                                 _interpolation_name(transform.interpolation.value))
    return ModelEntry(name, _torchvision_builder(tv_name), (crop, crop), _library_description("torchvision", pretrained),
                      pretrained=pretrained)


def _torchvision_builder(tv_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        import torchvision.models as tvm

        if in_channels != 3:
            raise DfadError(f"torchvision.{tv_name} takes 3-channel images; this data has {in_channels} channel(s)")
        return tvm.get_model(tv_name, weights=None, num_classes=num_classes)

    return build


def _timm_entry(name: str) -> ModelEntry:
    timm = import_timm()
    timm_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(timm_name):
        similar = timm.list_models(f"*{timm_name.split('.')[0]}*")[:8]
        hint = f"similar: {', '.join(TIMM_PREFIX + n for n in similar)}" if similar else \
            "dfad-edge models --timm 'PATTERN' lists them"
        raise DfadError(f"unknown timm architecture '{timm_name}' ({hint})")
    # A tag (timm.resnet18.a1_in1k) selects that weight's own config: crop and normalisation differ between tags.
    config = timm.get_pretrained_cfg(timm_name)
    input_size = tuple(config.input_size[-2:]) if config and config.input_size else (224, 224)
    pretrained = None
    if config and config.mean and config.std:
        pretrained = PretrainedInput(tuple(config.mean), tuple(config.std), config.crop_pct or DEFAULT_CROP_PCT,
                                     _interpolation_name(config.interpolation))
    fixed_input_size = bool(config and config.fixed_input_size)
    description = _library_description("timm", pretrained) + ("; fixed input size" if fixed_input_size else "")
    return ModelEntry(name, _timm_builder(timm_name), input_size, description, pretrained=pretrained,
                      fixed_input_size=fixed_input_size)


def _interpolation_name(name: str | None) -> str:
    """The resize a library's weights were evaluated with, as dfad-edge names it (bilinear or bicubic); another
    (nearest, random) is closest to bilinear."""
    return "bicubic" if name == "bicubic" else "bilinear"


def _library_description(library: str, pretrained: PretrainedInput | None) -> str:
    if not pretrained:
        return library
    return f"{library}; pretrained config: centre crop {pretrained.crop_pct:.3g}, {pretrained.interpolation}"


def _timm_builder(timm_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, in_channels: int = 3, img_size: list[int] | None = None) -> nn.Module:
        size = {"img_size": tuple(img_size)} if img_size else {}
        return import_timm().create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                          **size)

    return build


def create_model(name: str, **kwargs) -> nn.Module:
    entry = get_entry(name)
    try:
        return entry.builder(**kwargs)
    except TypeError as exc:
        raise DfadError(f"architecture '{name}' does not take these arguments {kwargs}: {exc}") from None


def default_input_size(name: str) -> tuple[int, int]:
    return get_entry(name).input_size


def build_kwargs(name: str, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> dict:
    """The keyword arguments that build this architecture for this data; a model built for one input size (ViT-style)
    is built for the size it will see."""
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    entry = get_entry(name)
    if entry.fixed_input_size and tuple(input_size) != entry.input_size:
        kwargs["img_size"] = list(input_size)
    return kwargs
