"""One way to name data everywhere (``--data``): ``digits``, ``cifar10``, ``cifar100`` or an ImageFolder directory.

Every source yields (image, label) with images as float tensors in [0, 1], C x H x W, in the data set's own
order; resizing and normalisation to a model's input spec happen in ``loaders``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import DfadError

BUILTIN_SOURCES = ("digits", "cifar10", "cifar100")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Per-data-set statistics used when a teacher is trained here; imported teachers bring their own.
NATURAL_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class DataSource:
    name: str
    num_classes: int
    class_names: list[str] | None
    channels: int
    natural_size: tuple[int, int] | None  # None: images of varying size (ImageFolder)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    is_natural_image: bool  # flips are a valid augmentation
    _splits: dict[str, Callable[[], Dataset]]

    def has_split(self, split: str) -> bool:
        return split in self._splits

    def dataset(self, split: str) -> Dataset:
        if split not in self._splits:
            raise DfadError(f"data source '{self.name}' has no '{split}' split (it has: {', '.join(self._splits)})")
        return self._splits[split]()


def resolve_source(data: str, data_dir: Path | None = None, download: bool = False) -> DataSource:
    if data == "digits":
        return _digits_source()
    if data in ("cifar10", "cifar100"):
        return _cifar_source(data, Path(data_dir or "./data"), download)
    path = Path(data)
    if path.is_dir():
        return _image_folder_source(path)
    raise DfadError(
        f"unknown data source '{data}': use one of {', '.join(BUILTIN_SOURCES)} or a directory in ImageFolder "
        "layout (DIR/train/<class>/* and DIR/test/<class>/*, or DIR/<class>/* as a test set)"
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # raw values are 0..16
    # A fixed stratified split, so every command sees the same 450 test images in the same order.
    return train_test_split(images, digits.target, test_size=0.25, stratify=digits.target, random_state=0)


def _digits_source() -> DataSource:
    train_x, test_x, train_y, test_y = _digits_arrays()
    mean, std = float(train_x.mean()), float(train_x.std())

    def as_dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    return DataSource(
        "digits", 10, [str(i) for i in range(10)], 1, (8, 8), (mean,), (std,), False,
        {"train": lambda: as_dataset(train_x, train_y), "test": lambda: as_dataset(test_x, test_y)},
    )


def _cifar_source(name: str, root: Path, download: bool) -> DataSource:
    import torchvision

    dataset_cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    num_classes = 10 if name == "cifar10" else 100

    def load(train: bool) -> Dataset:
        try:
            return dataset_cls(str(root), train=train, download=download, transform=torchvision.transforms.ToTensor())
        except RuntimeError as exc:
            raise DfadError(
                f"{name} not found under {root} ({exc}). Pass --data-dir to where it is, or --download to fetch it "
                "(needs network access), or point --data at an ImageFolder directory."
            ) from None
        except OSError as exc:
            raise DfadError(f"could not download {name} to {root}: {exc}. Without network access, copy the "
                            "data set there by hand or use an ImageFolder directory.") from None

    class_names = _cifar_class_names(root, name)
    mean, std = NATURAL_STATS[name]
    return DataSource(name, num_classes, class_names, 3, (32, 32), mean, std, True,
                      {"train": lambda: load(True), "test": lambda: load(False)})


def _cifar_class_names(root: Path, name: str) -> list[str] | None:
    import pickle

    meta = root / ("cifar-10-batches-py/batches.meta" if name == "cifar10" else "cifar-100-python/meta")
    if not meta.is_file():
        return None
    with open(meta, "rb") as handle:
        # The official meta file is a plain dict of lists of strings; only this known file is read.
        content = pickle.load(handle, encoding="latin1")
    return list(content.get("label_names") or content.get("fine_label_names") or []) or None


def _image_folder_source(root: Path) -> DataSource:
    split_dirs = {split: root / split for split in ("train", "test") if (root / split).is_dir()}
    if "test" not in split_dirs:
        if "train" in split_dirs:
            raise DfadError(f"{root} has train/ but no test/ folder")
        split_dirs = {"test": root}
    class_names = _list_classes(split_dirs["test"])
    if "train" in split_dirs and _list_classes(split_dirs["train"]) != class_names:
        raise DfadError(f"{root}/train and {root}/test have different class folders")
    channels = _probe_channels(split_dirs["test"], class_names)
    mean, std = NATURAL_STATS["imagenet"]
    if channels == 1:
        mean, std = (0.5,), (0.5,)
    splits = {split: (lambda d=d: ImageFolderDataset(d, class_names, channels)) for split, d in split_dirs.items()}
    return DataSource(str(root), len(class_names), class_names, channels, None, mean, std, True, splits)


def _list_classes(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DfadError(f"{folder} has no class folders: expected {folder}/<class>/<image>")
    return classes


def _probe_channels(folder: Path, class_names: list[str]) -> int:
    from PIL import Image

    first = next((p for p in sorted((folder / class_names[0]).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS), None)
    if first is None:
        raise DfadError(f"{folder / class_names[0]} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    with Image.open(first) as image:
        return 1 if image.mode in ("L", "1", "I;16", "I") else 3


def interleave_by_class(files_per_class: list[list[Path]]) -> list[tuple[Path, int]]:
    """One deterministic order in which every prefix holds each class in proportion to its size.

    The k-th file (sorted by name) of a class with n files sits at position (k + 0.5) / n along the set; ties go to the
    lower class index. With equal class sizes this is round-robin: class 0, 1, ..., C-1, class 0, ... So the first 10%
    of a test set (the quick estimate) is a representative sample, not the first class folder alone, and the order is
    the same on every machine and every run (no random numbers involved)."""
    keyed = [((rank + 0.5) / len(files), label, path)
             for label, files in enumerate(files_per_class) for rank, path in enumerate(files)]
    return [(path, label) for _position, label, path in sorted(keyed, key=lambda item: (item[0], item[1]))]


class ImageFolderDataset(Dataset):
    """root/<class>/<image>, classes interleaved in proportion (see interleave_by_class), files sorted by name."""

    def __init__(self, root: Path, class_names: list[str], channels: int):
        files_per_class = [sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                           for name in class_names]
        self.samples = interleave_by_class(files_per_class)
        if not self.samples:
            raise DfadError(f"no images found under {root}")
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.functional import pil_to_tensor

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                tensor = pil_to_tensor(image.convert(self.mode))
        except (UnidentifiedImageError, OSError) as exc:
            raise DfadError(f"cannot read image {path}: {exc}") from None
        return tensor.float().div_(255.0), label
