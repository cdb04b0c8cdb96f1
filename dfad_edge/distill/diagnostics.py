"""Mode-collapse diagnostics on synthetic batches: what the prior re-implementation could only guess at."""

from __future__ import annotations

import math

import torch

# Generator A ends in an affine-free BatchNorm, so images have unit variance per channel: two independent
# images sit about sqrt(2) ~ 1.41 apart (RMS per pixel); a collapsed generator drives this towards 0.
LOW_DIVERSITY = 0.25
LOW_ENTROPY = 0.5


def class_histogram(teacher_predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(teacher_predictions.cpu(), minlength=num_classes).float()


def normalised_entropy(histogram: torch.Tensor) -> float:
    """1.0 when the teacher predicts every class equally often, 0.0 when it predicts one class only."""
    probabilities = histogram / histogram.sum().clamp_min(1)
    nonzero = probabilities[probabilities > 0]
    entropy = float(-(nonzero * nonzero.log()).sum())
    return entropy / math.log(len(histogram)) if len(histogram) > 1 else 1.0


def mean_pairwise_distance(images: torch.Tensor, max_images: int = 256) -> float:
    """Mean RMS distance per pixel between distinct pairs of images."""
    flat = images[:max_images].flatten(1).float()
    if len(flat) < 2:
        return 0.0
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    count = len(flat)
    return float(distances.sum() / (count * (count - 1)))


def collapse_diagnostics(images: torch.Tensor, teacher_logits: torch.Tensor, num_classes: int) -> dict:
    histogram = class_histogram(teacher_logits.argmax(1), num_classes)
    confidence = torch.softmax(teacher_logits.float(), 1).max(1).values.mean()
    return {
        "class_entropy": round(normalised_entropy(histogram), 4),
        "classes_predicted": int((histogram > 0).sum()),
        "image_diversity": round(mean_pairwise_distance(images), 4),
        "teacher_confidence": round(float(confidence), 4),
        "class_histogram": histogram.int().tolist(),
    }


def expected_classes_hit(num_classes: int, images: int) -> float:
    """How many classes ``images`` draws spread evenly over ``num_classes`` hit on average: 512 images reach only
    ~401 of 1000 classes even from a perfectly balanced generator."""
    return num_classes * (1 - (1 - 1 / num_classes) ** images)


def collapse_warning(diagnostics: dict, num_classes: int) -> str | None:
    reasons = []
    if diagnostics["class_entropy"] < LOW_ENTROPY:
        reasons.append(f"class entropy {diagnostics['class_entropy']:.2f} < {LOW_ENTROPY}")
    expected = expected_classes_hit(num_classes, sum(diagnostics["class_histogram"]))
    if diagnostics["classes_predicted"] <= max(1.0, expected / 2):
        reasons.append(f"teacher predicts only {diagnostics['classes_predicted']}/{num_classes} classes (a balanced "
                       f"generator would hit ~{expected:.0f} with these images)")
    if diagnostics["image_diversity"] < LOW_DIVERSITY:
        reasons.append(f"image diversity {diagnostics['image_diversity']:.2f} < {LOW_DIVERSITY}")
    if not reasons:
        return None
    return ("possible mode collapse: " + "; ".join(reasons) +
            ". Try the remedies: --set bn_stats=10 --set class_balance=1 (see docs/methods.md, 'Mode collapse').")
