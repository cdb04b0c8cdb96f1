"""Learning-rate schedules as functions of progress through the run (0 at the start, 1 at the end).

Progress is the fraction of iterations done, or with a time budget the fraction of the budget spent, so one schedule
ends at the deadline whichever way the run is sized, and a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("multistep", "step", "cosine", "constant")


def epoch_progress(progress: float, epochs: int) -> float:
    """Progress rounded down to whole epochs: the published DFAD recipe steps its schedule once per epoch (stepping
    epoch milestones per iteration is a known way re-implementations broke it)."""
    return math.floor(progress * epochs + 1e-9) / epochs


def lr_factor(kind: str, progress: float, epochs: int, milestones: tuple[int, ...] = (), step_size: int = 1,
              gamma: float = 0.1, warmup: float = 0.0) -> float:
    """The factor on the base learning rate at this point of the run. Milestones and step sizes are in epochs;
    ``warmup`` (a fraction of the run) is time before which the optimiser is idle and after which the schedule starts."""
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(1e-9, 1.0 - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress - warmup) / span)))
    epoch = round(epoch_progress(progress, epochs) * epochs)
    if kind == "multistep":
        return gamma ** sum(epoch >= milestone for milestone in milestones)
    return gamma ** (epoch // step_size)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
