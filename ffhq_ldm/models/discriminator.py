"""PatchGAN discriminator (Isola et al. 2017, pix2pix), as used by LDM's autoencoders.

Each output logit judges one receptive-field patch of the input as real or fake, so the
discriminator pushes the decoder towards sharp local texture rather than global layout.
"""

from __future__ import annotations

import torch
from torch import nn


def _init_weights(module: nn.Module) -> None:
    # pix2pix / DCGAN initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """``layers`` stride-2 conv blocks of growing width, then a stride-1 block and a 1-channel conv.

    ``norm="batch"`` follows pix2pix/LDM; ``"group"`` avoids batch statistics (useful with
    tiny per-device batches or several processes without SyncBatchNorm).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3,
                 norm: str = "batch"):
        super().__init__()

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(min(32, c // 4 or 1), c)

        blocks = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            prev, width = width, channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(prev, width, 4, stride, 1, bias=False), norm_layer(width),
                       nn.LeakyReLU(0.2, True)]
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
