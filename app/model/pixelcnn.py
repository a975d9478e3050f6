"""PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks"): masked convolutions only.

A 7x7 mask-A convolution, residual blocks (1x1 -> kxk mask B -> 1x1, ReLU, skip), then 1x1 mask-B layers
to 256 logits per sub-pixel. It has the well-known blind spot (pixels up-right of the current one fall
outside the stacked 3x3 masks' reach); the Gated PixelCNN removes it.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .head import OutputHead, pointwise, scale_pixels
from .masked_conv import MaskedConv2d


class ResidualBlock(nn.Module):
    """x + (ReLU -> 1x1 to n/2 -> ReLU -> kxk mask B -> ReLU -> 1x1 back to n)."""

    def __init__(self, channels: int, kernel_size: int, image_channels: int) -> None:
        super().__init__()
        inner = channels // 2
        self.reduce = pointwise(channels, inner, image_channels)
        self.conv = MaskedConv2d(inner, inner, (kernel_size, kernel_size), "B", image_channels)
        self.expand = pointwise(inner, channels, image_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reduce(torch.relu(x))
        out = self.conv(torch.relu(out))
        return x + self.expand(torch.relu(out))


class PixelCNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c, n, k1 = config.image_channels, config.hidden_channels, config.first_kernel_size
        self.config = config
        self.input = MaskedConv2d(c, n, (k1, k1), "A", c)
        # Conditioning: a learned per-class bias on the residual stream (same for every pixel).
        self.class_bias = nn.Embedding(config.num_classes, n) if config.conditional else None
        self.blocks = nn.ModuleList(ResidualBlock(n, config.kernel_size, c) for _ in range(config.layers))
        self.head = OutputHead(n, config.head_channels, c)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: integer pixels (B, C, H, W) in 0..255 -> logits (B, 256, C, H, W)."""
        h = self.input(scale_pixels(x, self.input.weight.dtype))  # (B, n, H, W)
        if self.class_bias is not None:
            h = h + self.class_bias(labels)[:, :, None, None]
        for block in self.blocks:
            h = block(h)
        return self.head(h)
