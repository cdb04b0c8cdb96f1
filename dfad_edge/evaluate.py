"""Accuracy on the first 10%, 20% and 100% of a test set (top-1, top-k), per class, and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .checkpoint import ModelCheckpoint, load_checkpoint
from .data import check_compatible, make_loader, resolve_source, split_sizes
from .data.sources import DataSource
from .io import atomic_write_json
from .progress import track

Predictor = Callable[[torch.Tensor], torch.Tensor]  # normalised batch -> logits


def collect_predictions(predict: Predictor, loader, description: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and labels for the whole loader, in order."""
    predictions, labels = [], []
    for images, batch_labels in track(loader, len(loader), description):
        predictions.append(predict(images).argmax(1).cpu())
        labels.append(batch_labels)
    return torch.cat(predictions), torch.cat(labels)


def split_hit_rate(hits: torch.Tensor) -> dict[str, float]:
    """The share of True in the first 10%, 20% and 100% of a per-image hit vector."""
    return {name: float(hits[:n].float().mean()) for name, n in split_sizes(len(hits)).items()}


def split_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
    return split_hit_rate(predictions == labels), split_sizes(len(labels))


def split_top_k_accuracy(top_k: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-k from an N x k tensor of each image's k best classes."""
    return split_hit_rate((top_k == labels[:, None]).any(1))


def split_agreement(predictions: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return split_hit_rate(predictions == reference)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts, row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Top-1 of each true class (None for a class without test images)."""
    support = confusion.sum(1)
    return [float(confusion[c, c] / support[c]) if support[c] else None for c in range(len(confusion))]


def torch_predictor(model: nn.Module, device: torch.device) -> Predictor:
    model = model.to(device).eval()

    @torch.inference_mode()
    def predict(images: torch.Tensor) -> torch.Tensor:
        return model(images.to(device, non_blocking=True)).float()

    return predict


def loader_accuracy(model: nn.Module, loader, device: torch.device, description: str = "eval") -> dict[str, float]:
    """Top-1 on the 10/20/100% splits of a test loader."""
    predictions, labels = collect_predictions(torch_predictor(model, device), loader, description)
    return split_accuracy(predictions, labels)[0]


def evaluate_model(model: nn.Module, checkpoint: ModelCheckpoint, source: DataSource, device: torch.device,
                   batch_size: int = 256, description: str = "eval") -> dict:
    check_compatible(source, checkpoint.input_spec, checkpoint.num_classes, checkpoint.class_names)
    loader = make_loader(source, "test", checkpoint.input_spec, batch_size=batch_size)
    predictions, labels = collect_predictions(torch_predictor(model, device), loader, description)
    accuracy, sizes = split_accuracy(predictions, labels)
    return {"accuracy": accuracy, "images": sizes}


def evaluate_checkpoint(checkpoint_path: Path, data: str, device: torch.device, data_dir: Path | None = None,
                        download: bool = False, json_path: Path | None = None, batch_size: int = 256) -> dict:
    checkpoint = load_checkpoint(checkpoint_path)
    source = resolve_source(data, data_dir, download)
    result = {"checkpoint": str(checkpoint_path), "data": data,
              **evaluate_model(checkpoint.build_model(), checkpoint, source, device, batch_size)}
    if json_path:
        atomic_write_json(json_path, result)
    return result
