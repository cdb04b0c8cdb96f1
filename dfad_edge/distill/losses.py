"""Loss terms for distillation, composable so remedies against mode collapse plug in beside the adversarial term."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

LogitLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def student_logit_loss(kind: str, temperature: float = 1.0) -> LogitLoss:
    """Discrepancy between student and teacher logits (student minimises it, the generator maximises it)."""
    if kind == "l1":
        return lambda student_logits, teacher_logits: F.l1_loss(student_logits, teacher_logits)
    if kind == "mse":
        return lambda student_logits, teacher_logits: F.mse_loss(student_logits, teacher_logits)

    def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                        reduction="batchmean", log_target=True) * temperature**2

    return kl


def class_balance_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's information-entropy term: 0 when the teacher predicts every class equally often over the batch,
    up to log(C) when it predicts one class only. Counters generators that settle on a few classes."""
    mean_probabilities = F.softmax(teacher_logits.float(), 1).mean(0)
    entropy = -(mean_probabilities * torch.log(mean_probabilities + 1e-8)).sum()
    return torch.log(torch.tensor(float(teacher_logits.shape[1]))) - entropy


class BatchNormStatistics:
    """DeepInversion's feature-statistics prior: the batch mean/variance entering each teacher BatchNorm layer
    should match that layer's running statistics, which summarise the real training data."""

    def __init__(self, teacher: nn.Module):
        self.layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self.active = False
        self._terms: list[torch.Tensor] = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def _hook(self, layer: nn.BatchNorm2d, inputs, _output) -> None:
        if not self.active:
            return
        features = inputs[0].float()
        mean = features.mean(dim=(0, 2, 3))
        variance = features.var(dim=(0, 2, 3), unbiased=False)
        self._terms.append(torch.norm(mean - layer.running_mean, 2) + torch.norm(variance - layer.running_var, 2))

    def __enter__(self) -> "BatchNormStatistics":
        self.active, self._terms = True, []
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def loss(self) -> torch.Tensor:
        if not self._terms:
            return torch.zeros(())
        return torch.stack(self._terms).sum() / len(self.layers)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
