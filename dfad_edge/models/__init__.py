"""Model zoo. Importing this package registers every architecture."""

from . import cifar_resnet, generator, mobilenetv2_cifar, resnet_8x, small_cnn  # noqa: F401  (registration side effects)
from .registry import build_kwargs, create_model, default_input_size, get_entry, list_models, register_model

__all__ = ["build_kwargs", "create_model", "default_input_size", "get_entry", "list_models", "register_model"]
