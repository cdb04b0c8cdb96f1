"""Recompute a student's BatchNorm running statistics on the images it learns from, before it is saved or evaluated.

In training a BatchNorm layer normalises with the batch's statistics and keeps an exponential average of them for
inference. With a slow average the kept statistics describe the weights of hundreds of steps ago: torchvision's
MobileNetV3 uses momentum 0.01, and a 224-px run whose weights still move fast shipped a student at chance (10.0% on
CIFAR-10) that reached 38.75% once its statistics were recomputed on 512 of the run's own images (docs/results.md,
"Large images"). Recomputing them is data-free: the images are the method's calibration images (crops, generator
images, a sample of the pool), drawn as synthetic.pt's are.
With PyTorch's default momentum (0.1) the kept statistics follow the weights closely enough, and 512 fixed images
did slightly worse than them on digits (97.78% against 98.44%, mean of 3 seeds): so by default only slow layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .losses import batchnorm_layers


SLOW_MOMENTUM = 0.1  # PyTorch's default; below it a layer's average spans more than about ten steps


def has_slow_batchnorm(model: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``model`` averages its statistics slowly (momentum below 0.1, or None: the
    average over the whole run)."""
    return any(layer.momentum is None or layer.momentum < SLOW_MOMENTUM for layer in batchnorm_layers(model))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, forward: Callable[[torch.Tensor], object],
                          batch_size: int) -> None:
    """Replace the running statistics of ``model``'s BatchNorm layers by the exact average over ``images`` in
    batches of ``batch_size`` (the size of the student's training batch: a batch's variance depends on it); momenta
    and the training mode are restored. Only the BatchNorm layers run in training mode: dropout stays off, so the
    run's random numbers are not drawn. The images are shuffled first (a method may list its sources one after
    another, while its training batches mix them); with more than a batch, a last partial batch is left out (it would
    weigh as much as a full one). Under torchrun every rank calls this with as many images: synchronised layers add
    the ranks' statistics."""
    layers = batchnorm_layers(model)
    if not layers or len(images) < 2:  # e.g. a pool still empty: keep the running averages
        return
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(images.device)
    full_batches = max(len(images) // batch_size, 1)
    batches = images[order][:full_batches * batch_size].split(batch_size)
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average: every batch weighs the same
    model.eval()
    for layer in layers:
        layer.train()
    try:
        for batch in batches:
            forward(batch)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
