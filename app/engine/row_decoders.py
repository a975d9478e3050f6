"""The per-sub-pixel loop of a row, compiled with TorchScript.

A cached step is a few dozen small ops, so at small batches its cost is per-op overhead, not arithmetic.
Compiled, the loop runs in C++: about a third faster at batch 1 and, above all, without holding the GIL,
so several decode lanes (threads) sample in parallel on several cores and the HTTP event loop never
waits behind the decoder (see scheduler.py). The naive sampler runs the same `draw`.

A decoder holds the step's weights as matrices (see cached.py) and reads and writes the caches of one
row, passed as a flat list of tensors whose layout each decoder documents. Kept free of
`from __future__ import annotations`: TorchScript reads the annotations below.
"""

import torch
from torch import Tensor, nn

from app.engine.protocol import draw


def tanh_half_scale(channels: int, like: Tensor) -> Tensor:
    """(2n,): -2 for the tanh half of a gated pre-activation, 1 for the sigmoid half. Weights and biases
    that produce a pre-activation come multiplied by it, so that `scaled_gate` needs one sigmoid."""
    return torch.cat([torch.full((channels,), -2.0), torch.ones(channels)]).to(like)


def scaled_gate(pre: Tensor) -> Tensor:
    """tanh(a) * sigmoid(b) from (..., 2n) pre-activations whose tanh half a comes scaled by -2:
    sigmoid(b) * (1 - 2 sigmoid(-2a)), one sigmoid and one fused multiply-add instead of four ops (torch's
    CPU tanh costs 6x a sigmoid)."""
    sig_a, sig_b = torch.sigmoid(pre).chunk(2, dim=-1)  # sigmoid(-2a), sigmoid(b)
    return torch.addcmul(sig_b, sig_a, sig_b, value=-2.0)


class HeadStep(nn.Module):
    """The output head at one position: features (B, n) -> logits of colour c (B, 256)."""

    def __init__(self, hidden_w: Tensor, hidden_b: Tensor, logits_w: list[Tensor], logits_b: list[Tensor]) -> None:
        super().__init__()
        self.hidden_w, self.hidden_b = hidden_w, hidden_b
        self.logits_w, self.logits_b = logits_w, logits_b  # one (head, 256) matrix per colour

    def forward(self, features: Tensor, colour: int) -> Tensor:
        hidden = torch.relu(torch.addmm(self.hidden_b, torch.relu(features), self.hidden_w))
        return torch.addmm(self.logits_b[colour], hidden, self.logits_w[colour])


class RowDecoder(nn.Module):
    """Draws one row of every image in the batch; subclasses define `step` and `write`."""

    def forward(
        self,
        state: list[Tensor],
        uniforms: Tensor,
        temperature: Tensor,
        row: Tensor,
        log_prob: Tensor,
        forced: Tensor | None = None,
    ) -> None:
        """uniforms float64 (B, C, W), temperature float64 (B, 1); writes the values into row int64 (B, C, W)
        and adds their log p to log_prob (B,). forced int64 (B, C, W), if given: its values >= 0 are kept
        sub-pixels, written instead of the drawn ones and not counted in log_prob (protocol step 3)."""
        for j in range(uniforms.shape[2]):
            for colour in range(uniforms.shape[1]):
                logits = self.step(state, j, colour)
                values, lp = draw(logits, uniforms[:, colour, j], temperature)
                if forced is not None:
                    kept = forced[:, colour, j]
                    drawn = kept < 0
                    values = torch.where(drawn, values, kept)
                    lp = torch.where(drawn, lp, torch.zeros_like(lp))
                self.write(state, j, colour, values)
                row[:, colour, j] = values
                log_prob += lp

    def step(self, state: list[Tensor], j: int, colour: int) -> Tensor:
        raise NotImplementedError

    def write(self, state: list[Tensor], j: int, colour: int, values: Tensor) -> None:
        raise NotImplementedError


class GatedRowDecoder(RowDecoder):
    """Horizontal stack of the Gated PixelCNN, one sub-pixel at a time.

    state: L horizontal input buffers (B, W + kw - 1, in), then L row biases (B, W, 2n) holding all that
    the vertical stack adds to each column's pre-activation (computed once per row by begin_row).
    Weights and row biases come scaled by `tanh_half_scale` (see `scaled_gate`).
    """

    def __init__(
        self,
        h_weight: list[Tensor],
        h_width: list[int],
        out_weight: list[Tensor],
        out_bias: list[Tensor],
        channels: int,
        head: HeadStep,
    ) -> None:
        super().__init__()
        self.h_weight, self.h_width = h_weight, h_width
        self.out_weight, self.out_bias = out_weight, out_bias  # residual and skip 1x1s fused: (n, 2n), last (n, n)
        self.n = channels
        self.head = head

    @torch.jit.export
    def step(self, state: list[Tensor], j: int, colour: int) -> Tensor:
        """Logits (B, 256) of sub-pixel (current row, j, colour)."""
        layers = len(self.h_weight)
        skips: Tensor | None = None
        for index in range(layers):
            kw, buffer = self.h_width[index], state[index]
            window = buffer[:, j : j + kw].reshape(buffer.shape[0], -1)  # (B, kw * in)
            pre = torch.addmm(state[layers + index][:, j], window, self.h_weight[index])  # (B, 2n)
            # scaled_gate, written out: a call to a scripted function costs more than these two ops here.
            sig_a, sig_b = torch.sigmoid(pre).chunk(2, dim=1)  # sigmoid(-2a), sigmoid(b)
            gated = torch.addcmul(sig_b, sig_a, sig_b, value=-2.0)  # = tanh(a) * sigmoid(b)
            out = torch.addmm(self.out_bias[index], gated, self.out_weight[index])
            if index + 1 == layers:
                skip = out  # the last layer's residual output would feed nothing: its matrix is the skip's
            else:
                h, skip = out.chunk(2, dim=1)
                if index > 0:
                    h = h + buffer[:, j + kw - 1]
                state[index + 1][:, j + self.h_width[index + 1] - 1] = h
            skips = skip if skips is None else skips + skip
        assert skips is not None
        return self.head(skips, colour)

    @torch.jit.export
    def write(self, state: list[Tensor], j: int, colour: int, values: Tensor) -> None:
        """Sub-pixel (j, colour) is now `values` (B,): the first layer's input, scaled like scale_pixels."""
        buffer = state[0]
        buffer[:, j + self.h_width[0] - 1, colour] = values.to(buffer.dtype) / 127.5 - 1.0


class PixelCNNRowDecoder(RowDecoder):
    """The masked-conv PixelCNN at one position: every layer, from its window of rows.

    state: the input window (B, k//2 + 1, W + 2 (k//2), C), the input bias (B, n) (class bias included),
    then one window per residual block (B, half + 1, W + 2 half, n/2): rows i-half .. i, current row last.
    """

    def __init__(
        self,
        in_half: int,
        in_weight: Tensor,
        k_half: list[int],
        conv_weight: list[Tensor],
        conv_bias: list[Tensor],
        reduce_weight: list[Tensor],
        reduce_bias: list[Tensor],
        expand_weight: list[Tensor],
        expand_bias: list[Tensor],
        head: HeadStep,
    ) -> None:
        super().__init__()
        self.in_half, self.in_weight = in_half, in_weight
        self.k_half, self.conv_weight, self.conv_bias = k_half, conv_weight, conv_bias
        self.reduce_weight, self.reduce_bias = reduce_weight, reduce_bias
        self.expand_weight, self.expand_bias = expand_weight, expand_bias
        self.head = head

    @torch.jit.export
    def step(self, state: list[Tensor], j: int, colour: int) -> Tensor:
        inputs, input_bias = state[0], state[1]
        b = inputs.shape[0]
        patch = inputs[:, :, j : j + 2 * self.in_half + 1].reshape(b, -1)
        h = torch.addmm(input_bias, patch, self.in_weight)  # (B, n)
        for index in range(len(self.conv_weight)):
            half, buffer = self.k_half[index], state[2 + index]
            reduced = torch.addmm(self.reduce_bias[index], torch.relu(h), self.reduce_weight[index])
            buffer[:, half, j + half] = torch.relu(reduced)
            patch = buffer[:, :, j : j + 2 * half + 1].reshape(b, -1)  # rows i-half .. i, masked beyond (i, j)
            conv = torch.addmm(self.conv_bias[index], patch, self.conv_weight[index])
            h = h + torch.addmm(self.expand_bias[index], torch.relu(conv), self.expand_weight[index])
        return self.head(h, colour)

    @torch.jit.export
    def write(self, state: list[Tensor], j: int, colour: int, values: Tensor) -> None:
        inputs = state[0]
        inputs[:, self.in_half, j + self.in_half, colour] = values.to(inputs.dtype) / 127.5 - 1.0
