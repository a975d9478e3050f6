"""Pieces shared by both architectures: pixel scaling and the output head that produces the softmax logits."""

from __future__ import annotations

import torch
from torch import nn

from .config import LEVELS
from .masked_conv import MaskedConv2d


def scale_pixels(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer pixels 0..255 -> floats in [-1, 1]."""
    return x.to(dtype) / 127.5 - 1.0


def pointwise(in_channels: int, out_channels: int, image_channels: int) -> MaskedConv2d:
    """A 1x1 mask-B convolution: mixes channels without breaking RGB sub-pixel order."""
    return MaskedConv2d(in_channels, out_channels, (1, 1), "B", image_channels)


class OutputHead(nn.Module):
    """ReLU -> 1x1 -> ReLU -> 1x1 to 256 logits per sub-pixel."""

    def __init__(self, in_channels: int, head_channels: int, image_channels: int) -> None:
        super().__init__()
        self.image_channels = image_channels
        self.hidden = pointwise(in_channels, head_channels, image_channels)
        # Output channel o = level * C + colour, matching channel_groups(256 * C, C).
        self.logits = pointwise(head_channels, image_channels * LEVELS, image_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        out = self.logits(torch.relu(self.hidden(torch.relu(features))))  # (B, C*256, H, W)
        return out.view(b, LEVELS, self.image_channels, h, w)  # (B, 256, C, H, W)
