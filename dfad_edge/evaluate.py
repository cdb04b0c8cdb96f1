"""Top-1 accuracy on the first 10%, 20% and 100% of a test set."""

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


def split_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
    sizes = split_sizes(len(labels))
    accuracy = {name: float((predictions[:n] == labels[:n]).float().mean()) for name, n in sizes.items()}
    return accuracy, sizes


def split_agreement(predictions: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return {name: float((predictions[:n] == reference[:n]).float().mean()) for name, n in split_sizes(len(reference)).items()}


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
