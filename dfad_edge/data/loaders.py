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
    """The first 10%, 20% and 100% of the test set, in its order: torchvision CIFAR's own (already mixed), digits'
    fixed stratified split, ImageFolder's classes interleaved in proportion (data.sources.interleave_by_class)."""
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


def resize(image: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    resized = F.interpolate(image[None], size=size, mode=interpolation, align_corners=False, antialias=True)[0]
    return resized.clamp(0, 1) if interpolation == "bicubic" else resized  # bicubic overshoots, as PIL clips it


def center_crop(image: torch.Tensor, height: int, width: int, crop_pct: float,
                interpolation: str = "bilinear") -> torch.Tensor:
    """ImageNet-style evaluation (torchvision's Resize(size / crop_pct) + CenterCrop(size), timm's crop_pct): scale,
    keeping the aspect ratio, until the image covers size / crop_pct, then take the centre height x width."""
    cover_h, cover_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    image_h, image_w = image.shape[-2:]
    scale = max(cover_h / image_h, cover_w / image_w)
    scaled_h, scaled_w = max(cover_h, int(image_h * scale)), max(cover_w, int(image_w * scale))
    if (scaled_h, scaled_w) != (image_h, image_w):
        image = resize(image, (scaled_h, scaled_w), interpolation)
    top, left = int(round((scaled_h - height) / 2.0)), int(round((scaled_w - width) / 2.0))
    return image[..., top:top + height, left:left + width]


def fit_to_spec(image: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """An image of any size at the model's input size, the way its spec says the model was evaluated."""
    if spec.transform == "center_crop":
        return center_crop(image, spec.height, spec.width, spec.crop_pct, spec.interpolation)
    if image.shape[-2:] != (spec.height, spec.width):
        image = resize(image, (spec.height, spec.width), spec.interpolation)
    return image


class SpecTransform(Dataset):
    """Fit to the model's input size (stretched, or ImageNet-style centre crop; see fit_to_spec) and normalise with the
    model's own mean and std (plus optional augmentation)."""

    def __init__(self, base: Dataset, spec: InputSpec, augment: bool = False, allow_flip: bool = True):
        self.base, self.spec, self.augment, self.allow_flip = base, spec, augment, allow_flip
        self.mean = torch.tensor(spec.mean).view(-1, 1, 1)
        self.std = torch.tensor(spec.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        image = fit_to_spec(image, self.spec)
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
    # Every DataLoader iterator draws a seed for its workers; an ordered (evaluation) loader draws it from a private
    # generator, so evaluating never moves the training RNG: a run with and without evaluation trains identically.
    private_rng = None if shuffle else torch.Generator().manual_seed(0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      persistent_workers=False, drop_last=False, generator=private_rng)
