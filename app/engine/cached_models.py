"""The cached models, one per architecture: the weights re-laid out as matrices for one new position at a
time, `prefill` (one batched pass over the known rows), and the per-row work around the per-pixel loop
(`begin_row`, `end_row`). Each new sub-pixel costs only its own share of compute.

Gated PixelCNN (Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive Models"):
the vertical stack of row i sees only rows < i, so it runs once per row, before any pixel of row i is
drawn. Each layer keeps the last kh rows of its vertical input. The horizontal stack runs once per
sub-pixel over a small window of the current row (the last kw inputs of each layer).

Masked-conv PixelCNN: every layer keeps a window of its input rows i-k//2 .. i (current row last) and
computes only the new position from its masked neighbourhood.

The per-sub-pixel loop itself is a row decoder (row_decoders.py), run by one of the row loops of
row_loops.py. The torch methods here are the readable reference; for float32 models on the CPU the gated
model's vertical stack runs in the C kernel instead (c_kernel.py), and the two differ only by the rounding
of their sums (~1e-7 relative).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from app.model import ModelConfig
from app.model.gated import GatedLayer, GatedPixelCNN, gate
from app.model.head import OutputHead, scale_pixels
from app.model.masked_conv import MaskedConv2d
from app.model.pixelcnn import PixelCNN, ResidualBlock

from .cache import DecodeCache, GatedCache, PixelCNNCache
from .row_decoders import GatedRowDecoder, HeadStep, PixelCNNRowDecoder, scaled_gate, tanh_half_scale


def bias(conv: nn.Conv2d) -> torch.Tensor:
    """A convolution's bias: every convolution of these models has one."""
    assert conv.bias is not None
    return conv.bias


def matrix(conv: nn.Conv2d, rows: slice = slice(None)) -> torch.Tensor:
    """A (masked) conv kernel (out, in, kh, kw) as a (kh' * kw * in, out) matrix for a window laid out
    (rows, columns, channels), keeping only kernel rows `rows`."""
    weight = conv.masked_weight() if isinstance(conv, MaskedConv2d) else conv.weight
    weight = weight[:, :, rows]
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def head_step(head: OutputHead) -> HeadStep:
    c = head.image_channels
    w, b = matrix(head.logits), bias(head.logits)  # output channel = level * C + colour
    return HeadStep(
        matrix(head.hidden),
        bias(head.hidden),
        [w[:, k::c].contiguous() for k in range(c)],
        [b[k::c].contiguous() for k in range(c)],
    )


class CachedGated:
    def __init__(self, model: GatedPixelCNN) -> None:
        self.config: ModelConfig = model.config
        self.layers = cast(list[GatedLayer], list(model.layers))
        self.n = model.config.hidden_channels
        # Every weight and bias that produces a gated pre-activation comes with its tanh half scaled by -2
        # (see scaled_gate); the link's matrix divides that scale out of its input rows.
        self.pre_scale = tanh_half_scale(self.n, bias(self.layers[0].link))
        self.decoder = GatedRowDecoder(
            h_weight=[matrix(layer.horizontal) * self.pre_scale for layer in self.layers],
            h_width=[layer.rows for layer in self.layers],
            # Residual and skip 1x1 convolutions fused into one matrix: gated (B, n) -> (B, 2n); the last
            # layer's residual output reaches nothing, so its matrix is the skip's alone.
            out_weight=[torch.cat([matrix(g.residual), matrix(g.skip)], dim=1) for g in self.layers[:-1]]
            + [matrix(self.layers[-1].skip)],
            out_bias=[torch.cat([bias(g.residual), bias(g.skip)]) for g in self.layers[:-1]]
            + [bias(self.layers[-1].skip)],
            channels=self.n,
            head=head_step(model.head),
        )
        self.h_width = self.decoder.h_width
        # Images per step such that every image's pre-activations (2n floats) fill whole 32-float chunks
        # (the torch row loop's padding, see row_loops.TorchRows).
        self.batch_quantum = 32 // math.gcd(2 * self.n, 32)
        # The vertical stack per row is a matrix product over each column's window (rows, kw, in), not a
        # conv2d call: the convolution library picks its algorithm (and its rounding) by batch size.
        # One matrix per kernel row: pre-activations = bias + the sum over the kept rows (oldest first) of
        # row @ its matrix, accumulated in place in a fixed order; every product has the images' columns
        # as its rows.
        self.v_width = [g.vertical.kernel_size[1] for g in self.layers]
        self.v_weight = [
            [matrix(g.vertical, slice(r, r + 1)) * self.pre_scale for r in range(g.vertical.kernel_size[0])]
            for g in self.layers
        ]
        self.v_bias = [bias(g.vertical) * self.pre_scale for g in self.layers]
        # The vertical->horizontal link is a 1x1 conv: a matmul over a row's columns, with both biases;
        # it takes the gate-scaled vertical pre-activations and gives gate-scaled horizontal ones.
        self.link_weight = [matrix(g.link) / self.pre_scale[:, None] * self.pre_scale for g in self.layers]
        self.link_bias = [(bias(g.link) + bias(g.horizontal)) * self.pre_scale for g in self.layers]

    def class_biases(
        self, labels: torch.Tensor | None, batch: int, layer: GatedLayer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.class_bias is None:
            zero = bias(self.layers[0].link).new_zeros(batch, 2 * self.n)
            return zero, zero
        return layer.class_bias(labels).chunk(2, dim=1)

    def kept_rows(self, index: int) -> int:
        """Input rows layer `index`'s vertical stack keeps: layer 0 reads rows < i, later ones row i too."""
        rows = self.layers[index].vertical.kernel_size[0]
        return rows if index == 0 else rows - 1

    def prefill(self, canvas: torch.Tensor, labels: torch.Tensor | None, known_rows: int) -> DecodeCache:
        """Caches for decoding row `known_rows` onwards: one batched pass of the vertical stack over the
        known rows (which never sees a later row), keeping the last rows of every layer's input."""
        b, _, _, w = canvas.shape
        dtype = self.link_weight[0].dtype
        v = scale_pixels(canvas[:, :, :known_rows], dtype)  # (B, C, r, W)
        vertical_queues: list[list[torch.Tensor]] = []
        for index, layer in enumerate(self.layers):
            keep, kernel = self.kept_rows(index), layer.vertical.kernel_size
            pad = kernel[1] // 2
            queue = F.pad(v, (pad, pad, max(0, keep - known_rows), 0))[:, :, -keep:] if keep else v[:, :, :0]
            queue = queue if keep else F.pad(queue, (pad, pad))
            queue = queue.permute(0, 2, 3, 1)  # channels-last: (B, rows, W + 2 pad, in)
            vertical_queues.append([self.unfold_row(queue[:, k], kernel[1]) for k in range(keep)])
            if known_rows:
                class_bias, _ = self.class_biases(labels, b, layer)
                v = gate(layer.vertical(F.pad(v, layer.vertical_padding)) + class_bias[:, :, None, None])
            else:
                v = v.new_zeros(b, self.n, 0, w)
        return self.empty_cache(labels, b, canvas.device, dtype, vertical_queues)

    def empty_cache(
        self,
        labels: torch.Tensor | None,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        vertical: list[list[torch.Tensor]],
    ) -> GatedCache:
        """The caches with the kept vertical rows given (`vertical`, in the caller's layout): each image's
        class biases, and zero horizontal buffers (no pixel of the next row drawn yet)."""
        biases = [self.class_biases(labels, batch, layer) for layer in self.layers]
        return GatedCache(
            labels=labels if labels is not None else torch.zeros(batch, dtype=torch.long, device=device),
            vertical=vertical,
            v_bias=[vb * self.pre_scale for vb, _ in biases],
            h_bias=[hb * self.pre_scale for _, hb in biases],
            h_buffers=[
                torch.zeros(
                    (batch, self.config.width + kw - 1, self.config.image_channels if i == 0 else self.n),
                    dtype=dtype,
                    device=device,
                )
                for i, kw in enumerate(self.h_width)
            ],
            row_bias=[None] * len(self.layers),
        )

    @staticmethod
    def unfold_row(row: torch.Tensor, kw: int) -> torch.Tensor:
        """A zero-padded row (B, W + kw - 1, ch), channels-last -> (B, W, kw * ch): for each column, its kw
        neighbours' channels side by side (one strided copy: they already lie side by side in memory)."""
        row = row.contiguous()
        b, padded_width, ch = row.shape
        return row.as_strided((b, padded_width - kw + 1, kw * ch), (row.stride(0), ch, 1)).contiguous()

    def begin_row(self, state: DecodeCache) -> None:
        """Vertical stack for the row about to be drawn (it depends only on earlier rows). The readable
        reference: float32 CPU sampling with the C kernel runs NativeGatedVertical.begin_row instead, the
        same arithmetic with its sums in C's written order (they differ from MKL's by ~1e-7 relative).

        Channels-last throughout: each kept input row is already unfolded (B, W, kw * in), so a layer's
        pre-activations (B, W, 2n) are one matrix product per kernel row over all B * W columns, summed
        in place; the link is one more product."""
        s = cast(GatedCache, state)
        b, w = s.batch, self.config.width
        v_new = torch.empty(0)  # the previous layer's vertical output for this row, (B, W, n)
        for index in range(len(self.layers)):
            kw = self.v_width[index]
            rows = s.vertical[index]
            if index > 0:  # later layers also read this row of the layer below, then keep it
                rows = rows + [self.unfold_row(F.pad(v_new, (0, 0, kw // 2, kw // 2)), kw)]
                s.vertical[index] = rows[1:]
            # Pre-activations (B, W, 2n), the tanh half scaled by -2 (the class bias is scaled in prefill).
            weights = self.v_weight[index]
            v_pre = torch.addmm(self.v_bias[index], rows[0].view(b * w, -1), weights[0])  # (B W, 2n)
            for row, weight in zip(rows[1:], weights[1:]):
                v_pre.addmm_(row.view(b * w, -1), weight)  # in place: no copy of the running sum
            v_pre = v_pre.view(b, w, -1) + s.v_bias[index][:, None, :]
            # Everything the horizontal stack adds that does not depend on the current row, per column.
            link = torch.matmul(v_pre, self.link_weight[index])  # (B, W, 2n), gate-scaled
            s.row_bias[index] = link + (self.link_bias[index] + s.h_bias[index])[:, None, :]
            if index + 1 < len(self.layers):  # the next layer's vertical input (the last one has none)
                v_new = scaled_gate(v_pre)
            s.h_buffers[index].zero_()

    def row_state(self, state: DecodeCache) -> list[torch.Tensor]:
        """The caches the decoder reads and writes during a row, in its layout (after begin_row)."""
        s = cast(GatedCache, state)
        return s.h_buffers + cast(list[torch.Tensor], s.row_bias)

    def end_row(self, state: DecodeCache, row: torch.Tensor) -> None:
        """Push the finished image row (B, C, W) into the first layer's kept rows."""
        s = cast(GatedCache, state)
        kw = self.v_width[0]
        dtype = self.link_weight[0].dtype
        padded = F.pad(scale_pixels(row, dtype), (kw // 2, kw // 2)).transpose(1, 2)  # (B, W + 2 pad, C)
        s.vertical[0] = s.vertical[0][1:] + [self.unfold_row(padded, kw)]


class CachedPixelCNN:
    def __init__(self, model: PixelCNN) -> None:
        self.config: ModelConfig = model.config
        self.model = model
        self.in_half = model.input.kernel_size[0] // 2
        self.batch_quantum = 1  # no transcendental function: relu and matrix products
        self.blocks = blocks = cast(list[ResidualBlock], list(model.blocks))
        self.k_half = [blk.conv.kernel_size[0] // 2 for blk in blocks]
        self.decoder = PixelCNNRowDecoder(
            in_half=self.in_half,
            in_weight=matrix(model.input, slice(0, self.in_half + 1)),  # rows below the centre are masked
            k_half=self.k_half,
            conv_weight=[matrix(blk.conv, slice(0, p + 1)) for blk, p in zip(blocks, self.k_half)],
            conv_bias=[bias(blk.conv) for blk in blocks],
            reduce_weight=[matrix(blk.reduce) for blk in blocks],
            reduce_bias=[bias(blk.reduce) for blk in blocks],
            expand_weight=[matrix(blk.expand) for blk in blocks],
            expand_bias=[bias(blk.expand) for blk in blocks],
            head=head_step(model.head),
        )

    def prefill(self, canvas: torch.Tensor, labels: torch.Tensor | None, known_rows: int) -> DecodeCache:
        """Windows of rows i-k//2 .. i of every masked conv's input, from one pass over the known rows."""
        b, c, _, w = canvas.shape
        m = self.model
        dtype = self.decoder.in_weight.dtype
        known = scale_pixels(canvas[:, :, :known_rows], dtype)

        def window(features: torch.Tensor, half: int) -> torch.Tensor:
            # (B, ch, r, W) -> (B, half + 1, W + 2 * half, ch): the last `half` rows, then the current row.
            padded = F.pad(features, (half, half, max(0, half - known_rows), 1))[:, :, -(half + 1) :]
            return padded.permute(0, 2, 3, 1).contiguous()

        inputs = window(known, self.in_half)
        class_bias = m.class_bias(labels) if m.class_bias is not None else canvas.new_zeros(b, 1, dtype=dtype)
        h = m.input(known) + class_bias[:, :, None, None] if known_rows else None
        conv_inputs = []
        for block, half in zip(self.blocks, self.k_half):
            if h is not None:  # known rows
                reduced = torch.relu(block.reduce(torch.relu(h)))
                h = h + block.expand(torch.relu(block.conv(reduced)))
            else:
                reduced = canvas.new_zeros(b, block.conv.in_channels, 0, w, dtype=dtype)
            conv_inputs.append(window(reduced, half))
        return PixelCNNCache(
            labels=labels if labels is not None else canvas.new_zeros(b),
            input_bias=(bias(m.input) + class_bias).expand(b, m.input.out_channels).contiguous(),
            inputs=inputs,
            conv_inputs=conv_inputs,
        )

    def begin_row(self, state: DecodeCache) -> None:
        """Nothing is shared across a row: every layer is computed at each new position."""

    def row_state(self, state: DecodeCache) -> list[torch.Tensor]:
        s = cast(PixelCNNCache, state)
        return [s.inputs, s.input_bias, *s.conv_inputs]

    def end_row(self, state: DecodeCache, row: torch.Tensor) -> None:
        """Shift every window up one row; the new current row starts at zero."""
        s = cast(PixelCNNCache, state)
        s.inputs = F.pad(s.inputs[:, 1:], (0, 0, 0, 0, 0, 1))
        s.conv_inputs = [F.pad(buffer[:, 1:], (0, 0, 0, 0, 0, 1)) for buffer in s.conv_inputs]
