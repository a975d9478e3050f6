"""The one masked convolution both architectures are built from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_groups(channels: int, image_channels: int) -> torch.Tensor:
    """Which colour (0=R, 1=G, 2=B) each feature channel belongs to: channel c serves colour c % C.

    Sub-pixel causality for RGB is carried by these groups: features of group g may only depend on the
    colours < g of the current pixel (mask A) or <= g (mask B). With one image channel every group is 0.
    Interleaving (rather than contiguous blocks) keeps channel k and channel k + n in the same group
    whenever n is a multiple of C, so a gate that splits 2n channels into halves pairs like with like,
    and 256 * C output logits reshape to (256, C) with colour = channel % C.
    """
    return torch.arange(channels) % image_channels


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel is multiplied by a fixed 0/1 causal mask on every call.

    Positions of the kernel before `center` in raster order are visible, positions after it are hidden,
    and the centre itself connects input group gi to output group go (see `channel_groups`) when
    go > gi (mask "A": the current sub-pixel is hidden) or go >= gi (mask "B": it is visible).
    A 5x5 kernel, one image channel (o visible, . hidden, centre in brackets):

        mask A          mask B
        o o o o o       o o o o o
        o o o o o       o o o o o
        o o[.]. .       o o[o]. .
        . . . . .       . . . . .
        . . . . .       . . . . .

    The Gated PixelCNN's horizontal stack uses a 1 x k kernel with the centre at its right end, so it
    sees the k-1 pixels to the left plus the centre as the mask allows:  o o o [A: . | B: o].

    Padding is explicit (left, right, top, bottom) so the output keeps the input's size for any
    kernel/centre placement. The mask is applied functionally (weight * mask); weights are never mutated.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        mask_type: str,
        image_channels: int,
        center: tuple[int, int] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias=bias)
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        kh, kw = self.kernel_size
        ci, cj = center if center is not None else (kh // 2, kw // 2)
        self.mask_type = mask_type
        self.image_channels = image_channels
        self.padding_lrtb = (cj, kw - 1 - cj, ci, kh - 1 - ci)

        mask = torch.zeros(out_channels, in_channels, kh, kw)
        mask[:, :, :ci, :] = 1  # rows above the centre
        mask[:, :, ci, :cj] = 1  # left of the centre on its row
        g_out = channel_groups(out_channels, image_channels)[:, None]
        g_in = channel_groups(in_channels, image_channels)[None, :]
        centre = (g_out > g_in) if mask_type == "A" else (g_out >= g_in)
        mask[:, :, ci, cj] = centre.float()
        # Derived from the constructor arguments, so not stored in checkpoints.
        self.register_buffer("mask", mask, persistent=False)

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.padding_lrtb), self.masked_weight(), self.bias)
