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


class GeneratorA(nn.Module):
    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, channels: int = 3):
        super().__init__()
        if img_size % 4:
            raise DfadError(f"generator_a needs an image size divisible by 4, got {img_size}")
        self.nz, self.img_size, self.channels = nz, img_size, channels
        self.init_size = img_size // 4
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.project_bn = nn.BatchNorm2d(2 * ngf)
        self.block1 = nn.Sequential(
            nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1), nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2, inplace=True)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * ngf, ngf, 3, 1, 1), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2, inplace=True)
        )
        self.to_image = nn.Conv2d(ngf, channels, 3, 1, 1)
        # No affine parameters: this BN only standardises, which places images in the teacher's
        # normalised input space. Normalising generator output again is a known DFAD bug.
        self.output_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)
        x = self.project_bn(x)
        x = self.block1(F.interpolate(x, scale_factor=2))
        x = self.block2(F.interpolate(x, scale_factor=2))
        return self.output_bn(torch.tanh(self.to_image(x)))


@register_model("generator_a", (32, 32), "DFAD generator A (nz, ngf, img_size, channels)", is_generator=True)
def generator_a(nz: int = 256, ngf: int = 64, img_size: int = 32, channels: int = 3) -> nn.Module:
    return GeneratorA(nz, ngf, img_size, channels)


class PixelGenerator(nn.Module):
    """Linear -> 2ngf x s/4 x s/4, BN, up x2, conv BN LeakyReLU, up x2, conv BN LeakyReLU, conv, sigmoid. Any image size:
    it decodes at the next multiple of 4 and crops the centre."""

    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, channels: int = 3):
        super().__init__()
        if img_size < 4:
            raise DfadError(f"generator_pixels needs images of at least 4x4, got {img_size}")
        self.nz, self.img_size, self.channels = nz, img_size, channels
        self.init_size = -(-img_size // 4)
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.project_bn = nn.BatchNorm2d(2 * ngf)
        self.block1 = nn.Sequential(
            nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2, inplace=True)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * ngf, ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2, inplace=True)
        )
        self.to_image = nn.Conv2d(ngf, channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project_bn(self.project(z).view(z.shape[0], -1, self.init_size, self.init_size))
        x = self.block1(F.interpolate(x, scale_factor=2))
        x = self.block2(F.interpolate(x, scale_factor=2))
        pixels = torch.sigmoid(self.to_image(x))
        offset = (pixels.shape[-1] - self.img_size) // 2
        return pixels[..., offset:offset + self.img_size, offset:offset + self.img_size]


@register_model("generator_pixels", (32, 32), "pixel-space decoder of the pool method (nz, ngf, img_size, channels)",
                is_generator=True)
def generator_pixels(nz: int = 256, ngf: int = 64, img_size: int = 32, channels: int = 3) -> nn.Module:
    return PixelGenerator(nz, ngf, img_size, channels)
