"""Generators: latent vector -> image.

- "A" (DFAD): ends in an affine-free BatchNorm, so images land in the teacher's normalised input space.
- "pixels" (the decoder of the pool-based methods, Fast-DFKD/NAYER style): ends in a sigmoid, so images are pixels in
  [0, 1] that can be stored as 8-bit images and normalised with the model's own mean and std like real data.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DfadError
from .registry import register_model


def _pair_sums(taps: torch.Tensor, dim: int) -> torch.Tensor:
    """Along ``dim``, the 3 taps (a, b, c) of a 3x3 kernel as the 4 taps (c, b + c, a + b, a) of the equivalent
    stride-2 transposed convolution (UpsampleConv2d)."""
    a, b, c = taps.unbind(dim)
    return torch.stack([c, b + c, a + b, a], dim)


class UpsampleConv2d(nn.Conv2d):
    """Nearest x2 upsampling, then a 3x3 convolution (stride 1, padding 1): the generators' up-sampling layer, with a
    Conv2d's parameters (checkpoints keep their keys).

    Each 3x3 window of a nearest-upsampled image covers only 2x2 distinct input pixels, so the same output is one
    stride-2 transposed convolution of the input with a 4x4 kernel of sums of the 3x3 taps: 16 multiply-adds per
    input pixel and channel pair instead of 36, and no upsampled copy of the input. The generators spend most of their
    time in these two layers, and DFAD runs its generator on every batch. ``subpixel = False`` computes it as written.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, 1, 1, bias=bias)
        self.subpixel = True

    def extra_repr(self) -> str:
        return "upsample x2 (nearest), then " + super().extra_repr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.subpixel:
            return super().forward(F.interpolate(x, scale_factor=2))
        # Summed in the weights' own precision: elementwise adds, which autocast leaves alone; the transposed
        # convolution then casts the kernel as it would have cast the 3x3 one.
        kernel = _pair_sums(_pair_sums(self.weight, 2), 3).transpose(0, 1)  # (in, out, 4, 4)
        return F.conv_transpose2d(x, kernel, self.bias, stride=2, padding=1)


def upsampling_stages(img_size: int) -> int:
    """How many x2 up-sampling stages a generator uses: two up to 64 px (DFAD's design: 32 px from 8x8); above, one
    more per doubling until the first feature map is at most 8x8 (224 px: 7x7 and five stages), so the projection from
    the latent stays small (Linear(256 -> 128x56x56) was 103 M parameters at 224 px)."""
    stages = 2
    while img_size > 64 and img_size / 2 ** stages > 8:
        stages += 1
    return stages


def upsampling_blocks(module: nn.Module, ngf: int, stages: int, bias: bool) -> int:
    """Adds block1..blockN (up x2 and a 3x3 convolution, BatchNorm, LeakyReLU) to ``module``, from 2*ngf channels,
    halving the width at each stage down to ngf/4 (at 32 px: 2ngf -> 2ngf -> ngf, DFAD's generator A), so the
    full-resolution stages of a large image stay cheap. Returns the last stage's width."""
    width = 2 * ngf
    for index in range(stages):
        out = max(ngf // 4, (2 * ngf) >> index, 1)
        module.add_module(f"block{index + 1}", nn.Sequential(
            UpsampleConv2d(width, out, bias=bias), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)))
        width = out
    return width


def decode(generator: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The shared trunk: projection, BatchNorm, the up-sampling stages, the convolution to image channels; at the next
    multiple of 2^stages where the image size is not one (the caller crops)."""
    x = generator.project_bn(generator.project(z).view(z.shape[0], -1, generator.init_size, generator.init_size))
    for index in range(generator.stages):
        x = getattr(generator, f"block{index + 1}")(x)
    return generator.to_image(x)


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    offset = (images.shape[-1] - size) // 2
    return images[..., offset:offset + size, offset:offset + size]


class GeneratorA(nn.Module):
    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, channels: int = 3):
        super().__init__()
        if img_size < 4:
            raise DfadError(f"generator_a needs images of at least 4x4, got {img_size}")
        self.nz, self.img_size, self.channels = nz, img_size, channels
        self.stages = upsampling_stages(img_size)
        self.init_size = -(-img_size // 2 ** self.stages)
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.project_bn = nn.BatchNorm2d(2 * ngf)
        width = upsampling_blocks(self, ngf, self.stages, bias=True)
        self.to_image = nn.Conv2d(width, channels, 3, 1, 1)
        # No affine parameters: this BN only standardises, which places images in the teacher's
        # normalised input space. Normalising generator output again is a known DFAD bug.
        self.output_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.output_bn(centre_crop(torch.tanh(decode(self, z)), self.img_size))


@register_model("generator_a", (32, 32), "DFAD generator A (nz, ngf, img_size, channels)", is_generator=True)
def generator_a(nz: int = 256, ngf: int = 64, img_size: int = 32, channels: int = 3) -> nn.Module:
    return GeneratorA(nz, ngf, img_size, channels)


class PixelGenerator(nn.Module):
    """Linear -> 2ngf x s/4 x s/4, BN, (up x2, conv) BN LeakyReLU, (up x2, conv) BN LeakyReLU, conv, sigmoid (above
    64 px more stages from a smaller map, as GeneratorA). Any image size: it decodes at the next multiple of
    2^stages and crops the centre."""

    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, channels: int = 3):
        super().__init__()
        if img_size < 4:
            raise DfadError(f"generator_pixels needs images of at least 4x4, got {img_size}")
        self.nz, self.img_size, self.channels = nz, img_size, channels
        self.stages = upsampling_stages(img_size)
        self.init_size = -(-img_size // 2 ** self.stages)
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.project_bn = nn.BatchNorm2d(2 * ngf)
        width = upsampling_blocks(self, ngf, self.stages, bias=False)
        self.to_image = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return centre_crop(torch.sigmoid(decode(self, z)), self.img_size)


@register_model("generator_pixels", (32, 32), "pixel-space decoder of the pool method (nz, ngf, img_size, channels)",
                is_generator=True)
def generator_pixels(nz: int = 256, ngf: int = 64, img_size: int = 32, channels: int = 3) -> nn.Module:
    return PixelGenerator(nz, ngf, img_size, channels)
