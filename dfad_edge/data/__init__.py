"""Data sources (digits, CIFAR, ImageFolder) and loaders that feed them in a model's own input spec."""

from .loaders import SPLIT_FRACTIONS, check_compatible, make_loader, split_sizes
from .sources import NATURAL_STATS, DataSource, resolve_source

__all__ = ["SPLIT_FRACTIONS", "NATURAL_STATS", "DataSource", "check_compatible", "make_loader", "resolve_source",
           "split_sizes"]
