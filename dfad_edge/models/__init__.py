"""Model zoo. Importing this package registers every architecture."""

from . import cifar_resnet, generator, resnet_8x, small_cnn  # noqa: F401  (registration side effects)
from .registry import create_model, default_input_size, get_entry, list_models, register_model

__all__ = ["create_model", "default_input_size", "get_entry", "list_models", "register_model"]
