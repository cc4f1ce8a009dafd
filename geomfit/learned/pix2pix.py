"""The pix2pix baseline (Isola et al., "Image-to-image translation with conditional adversarial networks",
CVPR 2017): a U-Net generator and a 70x70 PatchGAN discriminator, trained non-progressively.

Galteri et al. (CVIU 2019, Sec. 5.7 and Table 4) compare their progressive refiner with pix2pix in the
configuration (DCE | D | D): DCE (or DCE+RGB) in, depth out, the discriminator on depth. The U-Net
here has ``log2(R)`` down-sampling steps (8 at 256x256: the paper's "U-Net-8"), 4x4 stride-2
convolutions, batch normalisation, LeakyReLU(0.2) in the encoder, ReLU and dropout 0.5 in the first
three decoder steps, and skip connections; the PatchGAN has three stride-2 4x4 convolutions and two
stride-1 ones (receptive field 70x70).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["UNetGenerator", "PatchDiscriminator"]


class UNetGenerator(nn.Module):
    """U-Net generator of pix2pix with ``log2(resolution)`` levels (U-Net-8 at 256x256).

    Parameters
    ----------
    in_ch, out_ch : int
    resolution : int
        Input size (power of two >= 4).
    ngf : int
        Filters of the first layer (64 in pix2pix); doubled per level up to ``8 ngf``.
    residual : bool
        Output = input's first ``out_ch`` channels + the last layer (zero-initialised, no tanh)
        instead of pix2pix's tanh image; geomfit's progressive refiner uses the same option.
    """

    def __init__(self, in_ch: int, out_ch: int, resolution: int = 256, ngf: int = 64, residual: bool = False):
        super().__init__()
        self.residual, self.out_ch = bool(residual), int(out_ch)
        n = int(round(math.log2(resolution)))
        if 2 ** n != resolution or n < 2:
            raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
        self.resolution = resolution
        widths = [min(ngf * 2 ** i, ngf * 8) for i in range(n)]
        self.down = nn.ModuleList()
        prev = in_ch
        for i, w in enumerate(widths):
            layers = [] if i == 0 else [nn.LeakyReLU(0.2)]
            layers.append(nn.Conv2d(prev, w, 4, 2, 1, bias=(i == 0 or i == n - 1)))
            if 0 < i < n - 1:
                layers.append(nn.BatchNorm2d(w))
            self.down.append(nn.Sequential(*layers))
            prev = w
        self.up = nn.ModuleList()
        for i in reversed(range(n)):
            w_in = widths[i] if i == n - 1 else widths[i] * 2
            w_out = out_ch if i == 0 else widths[i - 1]
            layers = [nn.ReLU(), nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=(i == 0))]
            if i > 0:
                layers.append(nn.BatchNorm2d(w_out))
                if i >= n - 3 and i < n:  # dropout in the three innermost decoder steps
                    layers.append(nn.Dropout(0.5))
            elif not residual:
                layers.append(nn.Tanh())
            self.up.append(nn.Sequential(*layers))
        if residual:
            nn.init.zeros_(self.up[-1][1].weight)
            nn.init.zeros_(self.up[-1][1].bias)

    def forward(self, x):
        feats = []
        h = x
        for d in self.down:
            h = d(h)
            feats.append(h)
        h = self.up[0](feats[-1])
        for k, u in enumerate(self.up[1:], start=2):
            h = u(torch.cat([h, feats[-k]], 1))
        return h + x[:, :self.out_ch] if self.residual else h


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (pix2pix ``n_layers=3``): one score per overlapping 70x70 patch."""

    def __init__(self, in_ch: int, ndf: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * 8, 1, 4, 1, 1),
        )

    def forward(self, x):
        return self.net(x)


def receptive_field(n_layers: int = 3) -> int:
    """Receptive field of the PatchGAN: kernel 4, strides 2 (n_layers times), then 1, 1 -> 70 for 3."""
    rf = 1
    for s in reversed([2] * n_layers + [1, 1]):
        rf = (rf - 1) * s + 4
    return rf
