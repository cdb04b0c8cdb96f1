"""Loss terms shared by the distillation methods, composable so each method picks the ones it needs."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import mean_over_ranks, sum_over_ranks, world_size
from ..errors import DfadError
from .student_init import block_stages

LogitLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  reduction: str = "batchmean") -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 so gradients keep their size."""
    divergence = F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                          reduction="none", log_target=True).sum(1) * temperature**2
    return divergence.mean() if reduction == "batchmean" else divergence


def student_logit_loss(kind: str, temperature: float = 1.0) -> LogitLoss:
    """Discrepancy between student and teacher logits (student minimises it, DFAD's generator maximises it)."""
    if kind == "l1":
        return lambda student_logits, teacher_logits: F.l1_loss(student_logits, teacher_logits)
    if kind == "mse":
        return lambda student_logits, teacher_logits: F.mse_loss(student_logits, teacher_logits)
    return lambda student_logits, teacher_logits: kl_divergence(student_logits, teacher_logits, temperature)


class ClassifierInput:
    """A network's penultimate features: the input of its classifier (the last linear layer with one output per
    class) at its latest forward, kept by a hook, which also fires inside a compiled forward."""

    def __init__(self, model: nn.Module, num_classes: int, role: str, option: str):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        if not linears:
            raise DfadError(f"the {role} has no linear classifier with {num_classes} outputs, so '{option}' cannot read "
                            f"its features: --set {option}=0")
        self.width = linears[-1].in_features
        self.latest: torch.Tensor | None = None
        linears[-1].register_forward_pre_hook(self._keep)

    def _keep(self, _layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.latest = inputs[0]


def stage_names(model: nn.Module) -> list[str]:
    """A network's stages: its called containers of blocks of one kind (a ResNet's layer1-3). Sequential only (a
    ModuleList is iterated, never called, so a hook on it would never fire), and of nested stages (timm's stages and
    their stages.N.blocks) the inner ones, so no output is kept twice."""
    stages = [name for name in block_stages(model) if isinstance(model.get_submodule(name), nn.Sequential)]
    return [name for name in stages if not any(other.startswith(f"{name}.") for other in stages)]


class StageOutputs:
    """The output of each of the named stages of a network at its latest forward, kept by hooks (on ``modules``, by
    default the stages themselves: a traced copy's identity layers after them, models/frozen.expose_outputs), which
    also fire inside a compiled forward if registered before its first call. Each is handed out once: a stage whose
    hook did not fire in the forward read is an error, not an old output."""

    def __init__(self, model: nn.Module, names: list[str], role: str, option: str, modules: list[str] | None = None):
        self.names, self.role, self.option = names, role, option
        self.latest: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(module).register_forward_hook(partial(self._keep, name))
                        for name, module in zip(names, modules or names)]

    def _keep(self, name: str, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self.latest[name] = output

    def outputs(self) -> list[torch.Tensor]:
        missing = [name for name in self.names if name not in self.latest]
        if missing:
            raise DfadError(f"the {self.role}'s forward did not call its {', '.join(missing)}, so '{self.option}' "
                            f"cannot read its output: --set {self.option}=0")
        return [self.latest.pop(name) for name in self.names]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.latest.clear()


def stage_match_loss(student_outputs: list[torch.Tensor], teacher_outputs: torch.Tensor) -> torch.Tensor:
    """The mean over stages of the L1 distance between the student's and the teacher's stage outputs, each relative
    to the teacher's mean magnitude in that stage, so that every stage weighs alike whatever the scale of its
    activations. ``teacher_outputs``: the stages' outputs flattened side by side, one row per image (as a replay memory
    keeps them)."""
    parts = teacher_outputs.split([output[0].numel() for output in student_outputs], 1)
    terms = [F.l1_loss(student.float().flatten(1), teacher) / teacher.abs().mean().clamp_min(1e-6)
             for student, teacher in zip(student_outputs, parts)]
    return torch.stack(terms).mean()


def agreement_masked_adversarial(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Fast-DFKD's adversarial term: push images to where the student departs from the teacher, but only on samples
    both still agree on (top-1), so the generator is not rewarded for images the teacher itself finds ambiguous."""
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(kl_divergence(student_logits, teacher_logits, reduction="none") * agree).mean()


def class_balance_loss(teacher_logits: torch.Tensor, distinct: int | None = None) -> torch.Tensor:
    """DAFL's information-entropy term: 0 when the teacher's predictions over the batch are spread as evenly as the
    batch allows, up to log(C) when it predicts one class only. Counters generators that settle on a few classes. A
    batch of B < C confident images can reach only log(B) (1000 classes, 64 images), so that is its target: against
    log(C) the term would never be met and would push every image towards an ambiguous, uniform prediction instead.
    ``distinct``: how many of a rank's images can be of different classes (the pool's come in pairs of one class);
    default all. Under torchrun the batch is every rank's share together."""
    mean_probabilities = mean_over_ranks(F.softmax(teacher_logits.float(), 1).mean(0))
    entropy = -(mean_probabilities * torch.log(mean_probabilities + 1e-8)).sum()
    images = distinct or teacher_logits.shape[0]
    reachable = math.log(min(teacher_logits.shape[1], images * world_size()))
    return F.relu(reachable - entropy)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def require_batchnorm(teacher: nn.Module, term: str) -> None:
    if not batchnorm_layers(teacher):
        raise DfadError(f"the teacher has no BatchNorm layers, so the '{term}' term (BatchNorm-statistics matching) cannot "
                        f"be computed: set it to 0 (--set {term}=0) to distil with the terms that do not need BatchNorm")


def batch_moments(features: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each tensor's per-channel mean and (biased) variance over its batch and positions; under torchrun over every
    rank's share together, with gradients to each share: one all-reduce of all the tensors' sums, then one of their
    squared deviations from the whole batch's mean (two passes: as accurate as a one-process variance)."""
    dims = [[0, *range(2, f.dim())] for f in features]
    shapes = [(1, -1) + (1,) * (f.dim() - 2) for f in features]
    counts = [f.numel() // f.shape[1] * world_size() for f in features]
    channels = [f.shape[1] for f in features]
    sums = sum_over_ranks(torch.cat([f.sum(d) for f, d in zip(features, dims)])).split(channels)
    means = [total / count for total, count in zip(sums, counts)]
    squares = sum_over_ranks(torch.cat([(f - m.view(s)).square().sum(d)
                                        for f, m, s, d in zip(features, means, shapes, dims)])).split(channels)
    return [(mean, total / count) for mean, total, count in zip(means, squares, counts)]


class BatchNormStatistics:
    """DeepInversion's feature-statistics prior: the batch mean/variance entering each teacher BatchNorm layer
    should match that layer's running statistics, which summarise the real training data.

    ``momentum`` blends each batch's statistics with the previous batch's (Fast-DFKD): with few synthesis steps per
    batch, a batch's own statistics are noisy, and the blend lets consecutive batches share the job of matching.
    Under torchrun the batch is every rank's share together (batch_moments)."""

    def __init__(self, teacher: nn.Module, momentum: float = 0.0, reduction: str = "mean"):
        self.layers = batchnorm_layers(teacher)
        self.momentum, self.reduction = momentum, reduction
        self.active = False
        self._inputs: list[tuple[nn.modules.batchnorm._BatchNorm, torch.Tensor]] = []
        self._current: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._previous: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for layer in self.layers:
            layer.register_forward_hook(self._hook)

    def _hook(self, layer: nn.modules.batchnorm._BatchNorm, inputs, _output) -> None:
        if self.active:
            self._inputs.append((layer, inputs[0].float()))

    def __enter__(self) -> "BatchNormStatistics":
        self.active, self._inputs = True, []
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def loss(self) -> torch.Tensor:
        """The layers' terms summed (DeepInversion, Fast-DFKD: deeper teachers weigh it more) or averaged."""
        if not self._inputs:  # a teacher forward that bypassed its BatchNorm layers would make this term silently 0
            raise RuntimeError("BatchNormStatistics saw no BatchNorm input: call Setup.teacher_logits(..., "
                               "original=True) inside its context")
        layers, features = zip(*self._inputs)
        self._inputs = []
        moments = batch_moments(list(features))
        self._current = [(mean.detach(), variance.detach()) for mean, variance in moments]
        terms = []
        for index, (layer, (mean, variance)) in enumerate(zip(layers, moments)):
            if self.momentum and self._previous is not None:
                previous_mean, previous_variance = self._previous[index]
                mean = (1 - self.momentum) * mean + self.momentum * previous_mean
                variance = (1 - self.momentum) * variance + self.momentum * previous_variance
            terms.append(torch.norm(mean - layer.running_mean, 2) + torch.norm(variance - layer.running_var, 2))
        total = torch.stack(terms).sum()
        return total if self.reduction == "sum" else total / len(self.layers)

    def remember_batch(self) -> None:
        """Fold the last measured batch's statistics into the moving average the next batches blend with."""
        if not self._current:
            return
        if self._previous is None or not self.momentum:
            self._previous = list(self._current)
            return
        blend = lambda old, new: self.momentum * old + (1 - self.momentum) * new
        self._previous = [(blend(old_mean, mean), blend(old_variance, variance))
                          for (old_mean, old_variance), (mean, variance) in zip(self._previous, self._current)]

    def state(self) -> list | None:
        return self._previous

    def load(self, state: list | None) -> None:
        self._previous = state

