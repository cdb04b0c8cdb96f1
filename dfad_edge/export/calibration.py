"""Calibration images for INT8: data-free from the images a distillation synthesised (synthetic.pt) by default, or
from real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import InputSpec
from ..data import check_compatible, make_loader, resolve_source
from ..errors import DfadError

SYNTHETIC_FILE = "synthetic.pt"


def synthetic_images(path: Path, spec: InputSpec, count: int, seed: int, skip: int = 0) -> torch.Tensor:
    """``count`` of the synthetic images the student trained on, in a seeded order after the first ``skip`` (so
    calibration and verification take disjoint images where the file holds enough), resized to the exported model's input size (the teacher's
    may differ from the student's)."""
    from ..distill import load_synthetic_images

    if not path.is_file():
        raise DfadError(
            f"data-free calibration needs the images the distillation synthesised, but {path} does not exist. "
            "Pass --synthetic PATH (the run folder's synthetic.pt) or --calib SRC to calibrate on real images."
        )
    images, images_spec = load_synthetic_images(path)
    if images_spec.channels != spec.channels:
        raise DfadError(f"{path.name} holds {images_spec.channels}-channel images, the model takes {spec.channels}")
    if count > len(images):
        raise DfadError(f"{path.name} holds {len(images)} images, fewer than the {count} asked for (lower --calib-images)")
    skip = min(skip, len(images) - count)  # disjoint from the first images while there are enough
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    picked = images[order[skip:skip + count]]
    if picked.shape[-2:] != (spec.height, spec.width):
        picked = F.interpolate(picked, size=(spec.height, spec.width), mode="bilinear", align_corners=False)
    return picked


def dataset_images(source_name: str, spec: InputSpec, num_classes: int, class_names, count: int, seed: int,
                   data_dir: Path | None = None, split: str | None = None) -> torch.Tensor:
    """A seeded random sample of real images (the train split when there is one), in the model's input spec."""
    source = resolve_source(source_name, data_dir)
    check_compatible(source, spec, num_classes, class_names)
    split = split or ("train" if source.has_split("train") else "test")
    loader = make_loader(source, split, spec, batch_size=256)
    dataset = loader.dataset
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return torch.stack([dataset[int(i)][0] for i in picks])


class TensorCalibrationReader:
    """ONNX Runtime's CalibrationDataReader protocol over an in-memory tensor."""

    def __init__(self, images: torch.Tensor, input_name: str, batch_size: int = 32):
        self.batches = [images[i:i + batch_size].numpy().astype(np.float32) for i in range(0, len(images), batch_size)]
        self.input_name = input_name
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0
