"""Per-sample augmentation of whole batches on the device, without a per-image Python loop: random translation and
flip (differentiable, for synthetic images), and the image prior's random resized crops of source images, rotation and
shear, colour jitter, CutMix and MixUp. Random numbers are drawn on the CPU (from ``rng`` where given, so diagnostics can
draw a fixed batch without moving the run's random stream) and moved to the device."""

from __future__ import annotations

import math

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


def _uniform(low: float, high: float, count: int, rng: torch.Generator | None) -> torch.Tensor:
    return torch.rand(count, generator=rng) * (high - low) + low


def resized_crop_boxes(sizes: torch.Tensor, picks: torch.Tensor, scale: tuple[float, float],
                       ratio: tuple[float, float], rng: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop's boxes, one per pick: an area fraction of the picked source drawn uniformly from ``scale``, a
    log-uniform aspect ratio from ``ratio``, clamped to fit (not retried), placed uniformly. Rows (x1, y1, x2, y2) in the
    source's pixels."""
    count = len(picks)
    heights, widths = sizes[picks, 0].float(), sizes[picks, 1].float()
    area = _uniform(*scale, count, rng) * heights * widths
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), count, rng))
    box_w = torch.sqrt(area * aspect).clamp(1.0, None).minimum(widths)
    box_h = torch.sqrt(area / aspect).clamp(1.0, None).minimum(heights)
    x1 = torch.rand(count, generator=rng) * (widths - box_w)
    y1 = torch.rand(count, generator=rng) * (heights - box_h)
    return torch.stack([x1, y1, x1 + box_w, y1 + box_h], 1)


def crop_and_resize(canvas: torch.Tensor, picks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crops of a float canvas (N x C x H x W), each resized to ``size``, in one call: RoIAlign averages 2 x 2
    bilinear samples per output pixel, which keeps downscaled crops from aliasing."""
    from torchvision.ops import roi_align

    rois = torch.cat([picks.float()[:, None], boxes], 1).to(canvas.device, canvas.dtype)
    return roi_align(canvas, rois, size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def random_rotate_shear(images: torch.Tensor, degrees: float, shear: float, rng: torch.Generator | None = None) -> torch.Tensor:
    """Each image rotated and sheared (horizontally) by angles drawn uniformly within +-degrees and +-shear, one
    grid_sample call for the batch; the border reflects. Crops are cut larger than the output and the centre kept, so
    the reflected corners mostly fall outside it."""
    count = len(images)
    angle = torch.deg2rad(_uniform(-degrees, degrees, count, rng))
    shear_tan = torch.tan(torch.deg2rad(_uniform(-shear, shear, count, rng)))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + cos * shear_tan
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos + sin * shear_tan
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def centre_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    top, left = (images.shape[-2] - size[0]) // 2, (images.shape[-1] - size[1]) // 2
    return images[..., top:top + size[0], left:left + size[1]]


def colour_jitter(images: torch.Tensor, strength: float, probability: float,
                  rng: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast and (for colour images) saturation, each scaled by a factor in [1 - s, 1 + s], on a random
    ``probability`` share of the batch; images in [0, 1]."""
    count = len(images)
    applied = (torch.rand(count, generator=rng) < probability).float()

    def factor() -> torch.Tensor:
        return (1 + applied * _uniform(-strength, strength, count, rng)).to(images.device).view(-1, 1, 1, 1)

    images = images * factor()
    grey = _luma(images)
    images = (images - grey.mean((2, 3), keepdim=True)) * factor() + grey.mean((2, 3), keepdim=True)
    if images.shape[1] == 3:
        grey = _luma(images)
        images = (images - grey) * factor() + grey
    return images.clamp(0, 1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] != 3:
        return images
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def random_flip(images: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    mirror = (torch.rand(len(images), generator=rng) < 0.5).to(images.device).view(-1, 1, 1, 1)
    return torch.where(mirror, images.flip(-1), images)


def cutmix(images: torch.Tensor, probability: float, alpha: float) -> torch.Tensor:
    """CutMix without labels (the teacher labels the mixed image): on a random ``probability`` share of the batch, a box
    of another image (a random pairing) pasted in, its area share 1 - lambda with lambda ~ Beta(alpha, alpha), each
    image its own box. Training only: it draws from the global random stream."""
    count, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    applied = torch.rand(count) < probability
    lam = torch.distributions.Beta(alpha, alpha).sample((count,))
    cut = torch.sqrt(1 - lam)
    box_h, box_w = (cut * height).round(), (cut * width).round()
    centre_y, centre_x = torch.rand(count) * height, torch.rand(count) * width
    y1, y2 = (centre_y - box_h / 2).clamp(0, height), (centre_y + box_h / 2).clamp(0, height)
    x1, x2 = (centre_x - box_w / 2).clamp(0, width), (centre_x + box_w / 2).clamp(0, width)
    rows, cols = torch.arange(height).view(1, -1, 1) + 0.5, torch.arange(width).view(1, 1, -1) + 0.5
    inside = ((rows >= y1.view(-1, 1, 1)) & (rows < y2.view(-1, 1, 1)) & (cols >= x1.view(-1, 1, 1))
              & (cols < x2.view(-1, 1, 1)) & applied.view(-1, 1, 1))
    partner = torch.randperm(count).to(images.device)
    return torch.where(inside[:, None].to(images.device), images[partner], images)


def mixup(images: torch.Tensor, probability: float, alpha: float) -> torch.Tensor:
    """MixUp without labels: on a random ``probability`` share of the batch, each image blended with its partner in a
    random pairing (as in CutMix, now and then itself) as lambda * image + (1 - lambda) * partner, lambda ~ Beta(alpha,
    alpha) per image; the rest unchanged.
    Training only: it draws from the global random stream."""
    count = images.shape[0]
    applied = torch.rand(count) < probability
    lam = torch.distributions.Beta(alpha, alpha).sample((count,))
    weight = torch.where(applied, lam, torch.ones(count)).to(images.device, images.dtype).view(-1, 1, 1, 1)
    partner = torch.randperm(count).to(images.device)
    return weight * images + (1 - weight) * images[partner]
