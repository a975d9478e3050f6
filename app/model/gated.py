"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

Two stacks per layer. The vertical stack at row i sees only rows < i (all columns in reach), so it has no
blind spot; the horizontal stack sees the current row up to the current pixel and receives the vertical
stack through a 1x1 link. Both use gated units tanh(a) * sigmoid(b); the horizontal stack is residual and
feeds skip connections into the output head. An optional per-class bias conditions every gated layer.

Shifts are done with padding, so no feature is ever computed from the current or a later row in the
vertical stack: layer 0 pads kh rows on top and drops one at the bottom (row i reads rows i-kh .. i-1),
later layers pad kh-1 rows (row i reads rows i-kh+1 .. i of features that already only see rows < i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .head import OutputHead, pointwise, scale_pixels
from .masked_conv import MaskedConv2d


def gate(pre: torch.Tensor) -> torch.Tensor:
    """(B, 2n, ...) -> (B, n, ...): tanh of the first half times sigmoid of the second."""
    a, b = pre.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    def __init__(self, in_channels: int, channels: int, kernel_size: int, first: bool, config: ModelConfig):
        super().__init__()
        k, c = kernel_size, config.image_channels
        self.rows = k // 2 + 1  # kernel height of the vertical stack, width of the horizontal one
        self.first = first
        self.vertical = nn.Conv2d(in_channels, 2 * channels, (self.rows, k))
        self.vertical_padding = (k // 2, k // 2, self.rows, -1) if first else (k // 2, k // 2, self.rows - 1, 0)
        self.horizontal = MaskedConv2d(
            in_channels, 2 * channels, (1, self.rows), "A" if first else "B", c, center=(0, self.rows - 1)
        )
        self.link = nn.Conv2d(2 * channels, 2 * channels, 1)  # vertical pre-activations -> horizontal
        self.residual = pointwise(channels, channels, c)
        self.skip = pointwise(channels, channels, c)
        # Per-class biases for the vertical and the horizontal pre-activations.
        self.class_bias = nn.Embedding(config.num_classes, 4 * channels) if config.conditional else None

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """v, h: (B, in, H, W) -> new v, new h, skip: (B, n, H, W) each."""
        v_pre = self.vertical(F.pad(v, self.vertical_padding))  # (B, 2n, H, W)
        h_pre = self.horizontal(h)
        if self.class_bias is not None:
            v_bias, h_bias = self.class_bias(labels)[:, :, None, None].chunk(2, dim=1)
            v_pre = v_pre + v_bias
            h_pre = h_pre + h_bias
        h_pre = h_pre + self.link(v_pre)
        gated = gate(h_pre)
        h_out = self.residual(gated)
        if not self.first:
            h_out = h_out + h
        return gate(v_pre), h_out, self.skip(gated)


class GatedPixelCNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c, n = config.image_channels, config.hidden_channels
        self.config = config
        self.layers = nn.ModuleList(
            GatedLayer(
                c if i == 0 else n, n, config.first_kernel_size if i == 0 else config.kernel_size, i == 0, config
            )
            for i in range(config.layers)
        )
        self.head = OutputHead(n, config.head_channels, c)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: integer pixels (B, C, H, W) in 0..255 -> logits (B, 256, C, H, W)."""
        v = h = scale_pixels(x, self.head.hidden.weight.dtype)
        skips = 0
        for layer in self.layers:
            v, h, skip = layer(v, h, labels)
            skips = skips + skip
        return self.head(skips)
