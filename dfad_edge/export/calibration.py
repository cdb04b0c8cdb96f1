"""Calibration images for INT8: data-free from the distillation generator by default, or from real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import InputSpec
from ..data import check_compatible, make_loader, resolve_source
from ..errors import DfadError

GENERATOR_FILE = "generator.pt"


def generator_images(generator_path: Path, spec: InputSpec, count: int, seed: int) -> torch.Tensor:
    """Images exactly as the student saw them in training (generator BatchNorm on batch statistics),
    resized to the exported model's input size (the teacher's may differ from the student's)."""
    from ..distill import load_generator

    if not generator_path.is_file():
        raise DfadError(
            f"data-free calibration needs the distillation generator, but {generator_path} does not exist. "
            "Pass --generator PATH (e.g. the run folder's generator.pt) or --calib SRC to calibrate on real images."
        )
    generator, generator_spec = load_generator(generator_path)
    if generator_spec.channels != spec.channels:
        raise DfadError(f"generator makes {generator_spec.channels}-channel images, the model takes {spec.channels}")
    generator.train()
    latent_rng = torch.Generator().manual_seed(seed)
    batches = []
    with torch.no_grad():
        for start in range(0, count, 256):
            z = torch.randn(min(256, count - start), generator.nz, generator=latent_rng)
            images = generator(z)
            if images.shape[-2:] != (spec.height, spec.width):
                images = F.interpolate(images, size=(spec.height, spec.width), mode="bilinear", align_corners=False)
            batches.append(images)
    return torch.cat(batches)


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
