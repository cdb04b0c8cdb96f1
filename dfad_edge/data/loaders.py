"""Feed a data source to a model the way the model was trained: its input size and its normalisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint import InputSpec
from ..errors import DfadError
from .sources import DataSource

SPLIT_FRACTIONS = {"10%": 0.1, "20%": 0.2, "100%": 1.0}


def split_sizes(total: int) -> dict[str, int]:
    """The first 10%, 20% and 100% of the test set, in the data set's own order."""
    return {name: max(1, math.floor(total * fraction + 1e-9)) for name, fraction in SPLIT_FRACTIONS.items()}


def check_compatible(source: DataSource, spec: InputSpec, num_classes: int, class_names: list[str] | None) -> None:
    if source.num_classes != num_classes:
        raise DfadError(
            f"class-count mismatch: data '{source.name}' has {source.num_classes} classes, the model {num_classes}"
        )
    if source.channels != spec.channels:
        raise DfadError(
            f"image-shape mismatch: data '{source.name}' has {source.channels}-channel images, "
            f"the model takes {spec.channels} channel(s)"
        )
    if class_names and source.class_names and list(class_names) != list(source.class_names):
        raise DfadError(
            f"class order mismatch between data and model: data {source.class_names[:5]}..., "
            f"model {list(class_names)[:5]}... Labels would be scored against the wrong classes."
        )


class SpecTransform(Dataset):
    """Resize to the model's input size and normalise with the model's own mean and std (plus optional augmentation)."""

    def __init__(self, base: Dataset, spec: InputSpec, augment: bool = False, allow_flip: bool = True):
        self.base, self.spec, self.augment, self.allow_flip = base, spec, augment, allow_flip
        self.mean = torch.tensor(spec.mean).view(-1, 1, 1)
        self.std = torch.tensor(spec.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        if image.shape[-2:] != (self.spec.height, self.spec.width):
            image = F.interpolate(image[None], size=(self.spec.height, self.spec.width), mode="bilinear",
                                  align_corners=False, antialias=True)[0]
        if self.augment:
            image = self._augment(image)
        return (image - self.mean) / self.std, int(label)

    def _augment(self, image: torch.Tensor) -> torch.Tensor:
        # Random crop with 1/8 padding (4 px at 32x32, 1 px at 8x8); horizontal flip only for natural images.
        pad = max(1, self.spec.height // 8)
        padded = F.pad(image, (pad, pad, pad, pad), mode="reflect" if image.shape[-1] > pad else "constant")
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        image = padded[:, top:top + self.spec.height, left:left + self.spec.width]
        if self.allow_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image


def make_loader(source: DataSource, split: str, spec: InputSpec, batch_size: int = 256, shuffle: bool = False,
                augment: bool = False, limit: int | None = None, workers: int | None = None) -> DataLoader:
    dataset: Dataset = SpecTransform(source.dataset(split), spec, augment, allow_flip=source.is_natural_image)
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    if workers is None:
        # Decoding image files benefits from worker processes; in-memory tensors do not.
        workers = 0 if source.natural_size and source.name in ("digits",) else min(2, torch.get_num_threads())
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      persistent_workers=False, drop_last=False)
