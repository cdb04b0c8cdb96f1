"""Differentiable per-sample augmentation on batches already on the device: random translation (a crop of a padded
image) and horizontal flip, in one grid_sample call."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift_flip(images: torch.Tensor, max_shift_fraction: float = 0.125, flip: bool = True) -> torch.Tensor:
    """Each image shifted by a whole number of pixels up to ``max_shift_fraction`` of its size (reflecting at the
    borders, like a random crop with padding) and, when ``flip``, mirrored with probability 1/2. Gradients flow
    through, so a generator can be optimised for what the teacher sees under augmentation."""
    batch, _channels, height, width = images.shape
    device = images.device
    max_dy, max_dx = int(height * max_shift_fraction), int(width * max_shift_fraction)
    # Whole-pixel shifts land exactly on pixel centres, so bilinear sampling copies pixels without blurring them.
    dy = torch.randint(-max_dy, max_dy + 1, (batch,), device=device).float() * 2 / height
    dx = torch.randint(-max_dx, max_dx + 1, (batch,), device=device).float() * 2 / width
    mirror = torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0) if flip else torch.ones(batch, device=device)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = mirror, dx
    theta[:, 1, 1], theta[:, 1, 2] = 1.0, dy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False).to(images.dtype)


def horizontal_flip_half(images: torch.Tensor) -> torch.Tensor:
    """Half the batch mirrored (chosen at random): a label-preserving view for flip-invariant teachers."""
    mirror = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(mirror.view(-1, *([1] * (images.dim() - 1))), images.flip(-1), images)
