"""Exact sampling with cached activations: each new sub-pixel costs only its own share of compute.

Like a KV cache in an LLM server: `prefill` runs one batched pass over the known rows of an image, then
`decode_row` generates one row at a time, and each step only computes the activations at the new pixel.

Gated PixelCNN (Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive Models"):
the vertical stack of row i sees only rows < i, so it runs once per row, before any pixel of row i is
drawn. Each layer keeps the last kh rows of its vertical input. The horizontal stack runs once per
sub-pixel over a small window of the current row (the last kw inputs of each layer).

Masked-conv PixelCNN: every layer keeps a window of its input rows i-k//2 .. i (current row last) and
computes only the new position from its masked neighbourhood.

Caches start at exact zeros where the full model zero-pads, so row 0 and column 0 see the same numbers
as in a full forward pass (bias is added to the convolution of the zeros, never to the padding itself).
All cache tensors have the batch first and none depends on the row index, so images at different rows
share one decode step; that is what lets the scheduler batch requests continuously.

This module does the per-row work (prefill, the vertical stack, shifting the caches) in Python; the
per-sub-pixel loop runs in a compiled row decoder (row_decoders.py). For float32 models on the CPU the
per-pixel loop and the gated model's vertical stack (begin_row, end_row) run in the C kernel instead
(native.py); the torch methods here stay the readable reference for everything else, and the two differ
only by the rounding of their sums (~1e-7 relative).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator
from dataclasses import Field, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from app.model import ModelConfig, SampleResult
from app.model.checkpoint import full_float32_on_cuda
from app.model.gated import GatedPixelCNN, gate
from app.model.head import OutputHead, scale_pixels
from app.model.masked_conv import MaskedConv2d
from app.model.pixelcnn import PixelCNN

from .native import NativeGatedDecoder, NativeGatedVertical, NativePixelCNNDecoder, load_kernel
from .posterior import infer_labels
from .protocol import row_uniforms, start_sampling
from .row_decoders import GatedRowDecoder, HeadStep, PixelCNNRowDecoder, scaled_gate, tanh_half_scale


@dataclass
class DecodeCache:
    """The caches of a batch of images: tensors, or lists of them (one per layer), batch dimension first.

    Fields marked `scratch` are recomputed at the start of every row (begin_row), so selecting or
    merging images drops them instead of copying them."""

    labels: torch.Tensor  # int64 (B,): the class of each image (zeros for an unconditional model)

    @property
    def batch(self) -> int:
        return self.labels.shape[0]

    def select(self, index: torch.Tensor) -> DecodeCache:
        """The caches of images `index` (B',), in that order (an index may repeat)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = [None] * len(value) if f.metadata.get("scratch") else _apply(value, lambda t: t[index])
        return type(self)(**picked)

    @staticmethod
    def concat(caches: list[DecodeCache]) -> DecodeCache:
        """The caches of all images of `caches` (of one type), in order."""
        cls = type(caches[0])
        merged = {}
        for f in fields(cls):
            parts = [getattr(c, f.name) for c in caches]
            merged[f.name] = [None] * len(parts[0]) if f.metadata.get("scratch") else _merge(parts)
        return cls(**merged)


def _apply(value, fn):
    """fn on every tensor of a tensor or a (nested) list of them."""
    return [_apply(v, fn) for v in value] if isinstance(value, list) else fn(value)


def _merge(parts: list):
    """torch.cat of corresponding tensors in equally shaped (nested) lists."""
    return [_merge(list(group)) for group in zip(*parts)] if isinstance(parts[0], list) else torch.cat(parts)


def scratch() -> Field:
    return field(metadata={"scratch": True})


@dataclass
class GatedCache(DecodeCache):
    # Per layer, the kept rows of its vertical input, oldest first, each unfolded: (B, W, kw * in) holds,
    # for column j, the kw columns j - kw//2 .. j + kw//2 of that row (zero-padded), channels innermost.
    vertical: list[list[torch.Tensor]]
    v_bias: list[torch.Tensor]  # per layer (B, 2n): class bias of the vertical pre-activation, gate-scaled
    h_bias: list[torch.Tensor]  # per layer (B, 2n): class bias of the horizontal pre-activation, gate-scaled
    h_buffers: list[torch.Tensor]  # per layer (B, W + kw - 1, in): the current row's horizontal inputs
    row_bias: list[torch.Tensor | None] = scratch()  # per layer (B, W, 2n): what the vertical stack adds


@dataclass
class PixelCNNCache(DecodeCache):
    input_bias: torch.Tensor  # (B, n): the input conv's bias plus the class bias
    inputs: torch.Tensor  # (B, k//2 + 1, W + 2 (k//2), C): rows i - k//2 .. i of the image, current row last
    conv_inputs: list[torch.Tensor]  # per block (B, half + 1, W + 2 half, n/2): its masked conv's input rows


def matrix(conv: nn.Conv2d, rows: slice = slice(None)) -> torch.Tensor:
    """A (masked) conv kernel (out, in, kh, kw) as a (kh' * kw * in, out) matrix for a window laid out
    (rows, columns, channels), keeping only kernel rows `rows`."""
    weight = conv.masked_weight() if isinstance(conv, MaskedConv2d) else conv.weight
    weight = weight[:, :, rows]
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def head_step(head: OutputHead) -> HeadStep:
    c = head.image_channels
    w, b = matrix(head.logits), head.logits.bias  # output channel = level * C + colour
    return HeadStep(
        matrix(head.hidden),
        head.hidden.bias,
        [w[:, k::c].contiguous() for k in range(c)],
        [b[k::c].contiguous() for k in range(c)],
    )


class CachedGated:
    def __init__(self, model: GatedPixelCNN) -> None:
        self.config: ModelConfig = model.config
        self.layers = list(model.layers)
        self.n = model.config.hidden_channels
        # Every weight and bias that produces a gated pre-activation comes with its tanh half scaled by -2
        # (see scaled_gate); the link's matrix divides that scale out of its input rows.
        self.pre_scale = tanh_half_scale(self.n, self.layers[0].link.bias)
        self.decoder = GatedRowDecoder(
            h_weight=[matrix(layer.horizontal) * self.pre_scale for layer in self.layers],
            h_width=[layer.rows for layer in self.layers],
            # Residual and skip 1x1 convolutions fused into one matrix: gated (B, n) -> (B, 2n); the last
            # layer's residual output reaches nothing, so its matrix is the skip's alone.
            out_weight=[torch.cat([matrix(g.residual), matrix(g.skip)], dim=1) for g in self.layers[:-1]]
            + [matrix(self.layers[-1].skip)],
            out_bias=[torch.cat([g.residual.bias, g.skip.bias]) for g in self.layers[:-1]]
            + [self.layers[-1].skip.bias],
            channels=self.n,
            head=head_step(model.head),
        )
        self.h_width = self.decoder.h_width
        # Images per step such that every image's pre-activations (2n floats) fill whole 32-float chunks;
        # with the C per-pixel loop but the torch vertical stack, only its per-row pre-activations (W * 2n
        # floats) must; with the C vertical stack too, nothing needs padding (CachedSampler.vertical).
        self.batch_quantum = 32 // math.gcd(2 * self.n, 32)
        self.row_batch_quantum = 32 // math.gcd(self.config.width * 2 * self.n, 32)
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
        self.v_bias = [g.vertical.bias * self.pre_scale for g in self.layers]
        # The vertical->horizontal link is a 1x1 conv: a matmul over a row's columns, with both biases;
        # it takes the gate-scaled vertical pre-activations and gives gate-scaled horizontal ones.
        self.link_weight = [matrix(g.link) / self.pre_scale[:, None] * self.pre_scale for g in self.layers]
        self.link_bias = [(g.link.bias + g.horizontal.bias) * self.pre_scale for g in self.layers]

    def class_biases(self, labels: torch.Tensor | None, batch: int, layer) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.class_bias is None:
            zero = self.layers[0].link.bias.new_zeros(batch, 2 * self.n)
            return zero, zero
        return layer.class_bias(labels).chunk(2, dim=1)

    def prefill(self, canvas: torch.Tensor, labels: torch.Tensor | None, known_rows: int) -> DecodeCache:
        """Caches for decoding row `known_rows` onwards: one batched pass of the vertical stack over the
        known rows (which never sees a later row), keeping the last rows of every layer's input."""
        b, c, _, w = canvas.shape
        dtype = self.link_weight[0].dtype
        v = scale_pixels(canvas[:, :, :known_rows], dtype)  # (B, C, r, W)
        vertical_queues, v_bias, h_bias = [], [], []
        for index, layer in enumerate(self.layers):
            kernel = layer.vertical.kernel_size
            keep = kernel[0] if index == 0 else kernel[0] - 1  # layer 0 reads rows < i; later ones row i too
            pad = kernel[1] // 2
            queue = F.pad(v, (pad, pad, max(0, keep - known_rows), 0))[:, :, -keep:] if keep else v[:, :, :0]
            queue = queue if keep else F.pad(queue, (pad, pad))
            queue = queue.permute(0, 2, 3, 1)  # channels-last: (B, rows, W + 2 pad, in)
            vertical_queues.append([self.unfold_row(queue[:, k], kernel[1]) for k in range(keep)])
            vb, hb = self.class_biases(labels, b, layer)
            v_bias.append(vb * self.pre_scale)
            h_bias.append(hb * self.pre_scale)
            if known_rows:
                v = gate(layer.vertical(F.pad(v, layer.vertical_padding)) + vb[:, :, None, None])
            else:
                v = v.new_zeros(b, self.n, 0, w)
        h_buffers = [
            canvas.new_zeros(b, w + kw - 1, c if i == 0 else self.n, dtype=dtype) for i, kw in enumerate(self.h_width)
        ]
        return GatedCache(
            labels=labels if labels is not None else canvas.new_zeros(b),
            vertical=vertical_queues,
            v_bias=v_bias,
            h_bias=h_bias,
            h_buffers=h_buffers,
            row_bias=[None] * len(self.layers),
        )

    @staticmethod
    def unfold_row(row: torch.Tensor, kw: int) -> torch.Tensor:
        """A zero-padded row (B, W + kw - 1, ch), channels-last -> (B, W, kw * ch): for each column, its kw
        neighbours' channels side by side (one strided copy: they already lie side by side in memory)."""
        row = row.contiguous()
        b, padded_width, ch = row.shape
        return row.as_strided((b, padded_width - kw + 1, kw * ch), (row.stride(0), ch, 1)).contiguous()

    def begin_row(self, s: GatedCache) -> None:
        """Vertical stack for the row about to be drawn (it depends only on earlier rows). The readable
        reference: float32 CPU sampling with the C kernel runs NativeGatedVertical.begin_row instead, the
        same arithmetic with its sums in C's written order (they differ from MKL's by ~1e-7 relative).

        Channels-last throughout: each kept input row is already unfolded (B, W, kw * in), so a layer's
        pre-activations (B, W, 2n) are one matrix product per kernel row over all B * W columns, summed
        in place; the link is one more product."""
        b, w = s.batch, self.config.width
        v_new = None  # the previous layer's vertical output for this row, (B, W, n)
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

    def row_state(self, s: DecodeCache) -> list[torch.Tensor]:
        """The caches the decoder reads and writes during a row, in its layout."""
        return s.h_buffers + s.row_bias

    def end_row(self, s: GatedCache, row: torch.Tensor) -> None:
        """Push the finished image row (B, C, W) into the first layer's kept rows."""
        kw = self.v_width[0]
        dtype = self.link_weight[0].dtype
        padded = F.pad(scale_pixels(row, dtype), (kw // 2, kw // 2)).transpose(1, 2)  # (B, W + 2 pad, C)
        s.vertical[0] = s.vertical[0][1:] + [self.unfold_row(padded, kw)]


class CachedPixelCNN:
    def __init__(self, model: PixelCNN) -> None:
        self.config: ModelConfig = model.config
        self.model = model
        self.in_half = model.input.kernel_size[0] // 2
        self.batch_quantum = self.row_batch_quantum = 1  # no transcendental function: relu and matrix products
        blocks = list(model.blocks)
        self.k_half = [blk.conv.kernel_size[0] // 2 for blk in blocks]
        self.decoder = PixelCNNRowDecoder(
            in_half=self.in_half,
            in_weight=matrix(model.input, slice(0, self.in_half + 1)),  # rows below the centre are masked
            k_half=self.k_half,
            conv_weight=[matrix(blk.conv, slice(0, p + 1)) for blk, p in zip(blocks, self.k_half)],
            conv_bias=[blk.conv.bias for blk in blocks],
            reduce_weight=[matrix(blk.reduce) for blk in blocks],
            reduce_bias=[blk.reduce.bias for blk in blocks],
            expand_weight=[matrix(blk.expand) for blk in blocks],
            expand_bias=[blk.expand.bias for blk in blocks],
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
        for block, half in zip(m.blocks, self.k_half):
            if known_rows:
                reduced = torch.relu(block.reduce(torch.relu(h)))
                h = h + block.expand(torch.relu(block.conv(reduced)))
            else:
                reduced = canvas.new_zeros(b, block.conv.in_channels, 0, w, dtype=dtype)
            conv_inputs.append(window(reduced, half))
        return PixelCNNCache(
            labels=labels if labels is not None else canvas.new_zeros(b),
            input_bias=(m.input.bias + class_bias).expand(b, m.input.out_channels).contiguous(),
            inputs=inputs,
            conv_inputs=conv_inputs,
        )

    def begin_row(self, s: DecodeCache) -> None:
        """Nothing is shared across a row: every layer is computed at each new position."""

    def row_state(self, s: DecodeCache) -> list[torch.Tensor]:
        return [s.inputs, s.input_bias, *s.conv_inputs]

    def end_row(self, s: DecodeCache, row: torch.Tensor) -> None:
        """Shift every window up one row; the new current row starts at zero."""
        s.inputs = F.pad(s.inputs[:, 1:], (0, 0, 0, 0, 0, 1))
        s.conv_inputs = [F.pad(buffer[:, 1:], (0, 0, 0, 0, 0, 1)) for buffer in s.conv_inputs]


def exact_execution():
    """Run TorchScript unoptimized: exactly the ops written, as eager mode would, never a rewritten graph
    (an optimized graph may, say, split addmm into mm + add, which rounds differently), so the compiled
    loop stays bit-identical to the naive sampler whatever ran before. Costs nothing measurable here: the
    loop's time is in the ops themselves. Every call into a compiled decoder goes through this."""
    return torch.jit.optimized_execution(False)


def script(decoder: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript-compile a row decoder. torch.jit.script is deprecated in favour of torch.compile, but
    on CPU torch.compile needs a C++ toolchain at run time (not in the server image) and does not release
    the GIL for a Python loop; the pinned torch still runs TorchScript, and `compiled=False` runs the very
    same module eagerly should that ever stop."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning)
        return torch.jit.script(decoder)


CUDA_BATCH = 64  # on CUDA every decode step runs at this batch size (one fixed shape, one kernel choice)


class CachedSampler:
    """Prefill + row-by-row decode for any model of this package.

    Batch invariance: an image's numbers never depend on which other images share its decode steps.
    Every reduction is a matrix product in which each image is one row of the left operand, and the
    batch is padded (with copies of its first image) to a size where that holds bit for bit:
    - CPU (MKL): a product with one row takes another kernel (gemv) than one with two or more, whose
      rows are all summed alike; so at least 2 images.
    - Elementwise ops vectorise in chunks of 32 floats and finish a tensor's odd tail with scalar code
      that rounds transcendental functions differently; so a multiple of `batch_quantum` images, which
      makes each image's share of a gated pre-activation a whole number of chunks.
    - CUDA: cuBLAS chooses kernels by shape, so every step runs at CUDA_BATCH images (TF32 is off, see
      app.model.load).
    tests/test_batch_invariance.py checks this against crowds of other requests.

    `static_rows`: run each row's per-pixel loop on static buffers of fixed batch buckets (gated models
    only). On CUDA this is on by default and each bucket's loop is captured in a CUDA graph when the
    sampler is built (`capture_graphs`), so a row costs one graph launch instead of ~20 kernel launches
    per layer per pixel; elsewhere it is off (the copies cost more than they save) but can be forced for
    testing the same code path eagerly.

    `compiled`: run the row loop compiled (the default: faster, and GIL-free, which is what lets the
    engine's decode lanes run in parallel) or as the plain module it also is. Compiled means, for a
    float32 model on the CPU, the C kernel of native.py when it builds, else TorchScript.
    The C kernel computes every image on its own, so it needs no padding to 2 images; for a gated model
    it runs the vertical stack too (`vertical`, NativeGatedVertical), so there is no torch elementwise op
    left to pad for and a step runs at its own batch size (without it, the chunk padding of the vertical
    stack's elementwise ops, `row_batch_quantum`, would still apply). `native=False` keeps the
    TorchScript decoder even where the kernel builds (the reference it is compared with).
    """

    def __init__(
        self, model: nn.Module, static_rows: bool | None = None, compiled: bool = True, native: bool = True
    ) -> None:
        self.config: ModelConfig = model.config
        self.device = next(model.parameters()).device
        with torch.no_grad():
            self.impl = CachedGated(model) if isinstance(model, GatedPixelCNN) else CachedPixelCNN(model)
        self.decoder = script(self.impl.decoder) if compiled else self.impl.decoder
        on_cuda = self.device.type == "cuda"
        self.native = None
        self.vertical = None  # the C vertical stack of a gated model (NativeGatedVertical), with `native`
        gated = isinstance(self.impl, CachedGated)
        if native and compiled and not on_cuda and next(model.parameters()).dtype == torch.float32:
            library = load_kernel()
            if library is not None:
                native = NativeGatedDecoder if gated else NativePixelCNNDecoder
                self.native = native(library, self.impl.decoder, self.config.width, self.config.image_channels)
                if gated:  # the vertical stack too (begin_row, end_row), in the same C library
                    self.vertical = NativeGatedVertical(library, self.impl)
        if on_cuda:
            full_float32_on_cuda()
        # The padding of every decode step (see padded_batch), fixed by the decoder that runs.
        if on_cuda:
            self.batch_quantum, self.min_batch = CUDA_BATCH, CUDA_BATCH
        elif self.vertical is not None:  # every per-row and per-pixel number computed in C, image by image
            self.batch_quantum, self.min_batch = 1, 1
        elif self.native is not None:
            self.batch_quantum, self.min_batch = self.impl.row_batch_quantum, 1
        else:
            self.batch_quantum, self.min_batch = self.impl.batch_quantum, 2
        if static_rows is None:
            static_rows = on_cuda
        buckets = (CUDA_BATCH,) if on_cuda else (2, 4, 8, 16, 32, 64)
        self.static_rows = StaticRows(self, capture=on_cuda, buckets=buckets) if static_rows and gated else None

    @torch.no_grad()
    def capture_graphs(self) -> None:
        """Record the CUDA graph of every static bucket now (the engine does this before it serves)."""
        if self.static_rows is None or not self.static_rows.capture:
            return
        for bucket in self.static_rows.buckets:
            canvas = torch.zeros((bucket, *self.config.shape), dtype=torch.long, device=self.device)
            labels = torch.zeros(bucket, dtype=torch.long, device=self.device) if self.config.conditional else None
            state = self.impl.prefill(canvas, labels, 0)
            self.impl.begin_row(state)
            self.static_rows.prepare(state, bucket)

    def padded_batch(self, batch: int) -> int:
        """The batch size a step of `batch` images runs at (see the class docstring)."""
        q = self.batch_quantum
        return max(self.min_batch, -(-batch // q) * q)

    @torch.no_grad()
    def prefill(self, canvas: torch.Tensor, labels: torch.Tensor | None, known_rows: int) -> DecodeCache:
        """Caches for decoding row `known_rows` onwards. One image at a time when rows are known: the
        convolutions over them round by batch size, and an image's caches must not depend on its request's
        size. With none known the caches are zeros and class biases (a lookup and exact products), the same
        numbers for any batch, so the whole batch is prefilled at once."""
        canvas = canvas.to(self.device)
        labels = None if labels is None else labels.to(self.device)
        if known_rows == 0:
            return self.impl.prefill(canvas, labels, 0)
        caches = [
            self.impl.prefill(canvas[i : i + 1], None if labels is None else labels[i : i + 1], known_rows)
            for i in range(canvas.shape[0])
        ]
        return caches[0] if len(caches) == 1 else DecodeCache.concat(caches)

    @torch.no_grad()
    def decode_row(
        self, state: DecodeCache, uniforms: torch.Tensor, temperature: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one row for every image in the batch; `state` moves on to the next row.

        uniforms (B, C, W) float64, temperature (B, 1) -> values int64 (B, C, W), log p of the row (B,)."""
        b = state.batch
        padded = self.padded_batch(b)
        work = state
        if padded != b:  # extra images: copies of the first, drawn with harmless uniforms, then dropped
            work = state.select(torch.cat([torch.arange(b), torch.zeros(padded - b, dtype=torch.long)]).to(self.device))
            uniforms = torch.cat([uniforms, uniforms.new_full((padded - b, *uniforms.shape[1:]), 0.5)])
            temperature = torch.cat([temperature, temperature.new_ones((padded - b, 1))])
        row, log_prob = self._decode_row(work, uniforms, temperature)
        if padded != b:
            kept = work.select(torch.arange(b, device=self.device))
            for f in fields(state):
                setattr(state, f.name, getattr(kept, f.name))
        return row[:b], log_prob[:b]

    def _decode_row(self, state: DecodeCache, uniforms: torch.Tensor, temperature: torch.Tensor):
        per_row = self.vertical if self.vertical is not None else self.impl  # C, else the torch reference
        per_row.begin_row(state)
        if self.static_rows is not None and state.batch <= self.static_rows.buckets[-1]:
            row, log_prob = self.static_rows.run(state, uniforms, temperature)
        else:
            row = torch.empty(
                (state.batch, self.config.image_channels, self.config.width), dtype=torch.long, device=self.device
            )
            log_prob = torch.zeros(state.batch, dtype=torch.float64, device=self.device)
            self.decode_pixels(state, uniforms.to(self.device), temperature.to(self.device), row, log_prob)
        per_row.end_row(state, row)
        return row, log_prob

    def decode_pixels(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        row: torch.Tensor,
        log_prob: torch.Tensor,
    ) -> None:
        """The per-sub-pixel loop of one row, writing into `row` and adding to `log_prob` in place."""
        if self.native is not None:
            self.native(self.impl.row_state(state), uniforms, temperature, row, log_prob)
            return
        with exact_execution():
            self.decoder(self.impl.row_state(state), uniforms, temperature, row, log_prob)

    @torch.no_grad()
    def step(self, state: DecodeCache, j: int, colour: int) -> torch.Tensor:
        """Logits (B, 256) of sub-pixel (current row, j, colour), between begin_row and end_row."""
        with exact_execution():
            return self.decoder.step(self.impl.row_state(state), j, colour)

    @torch.no_grad()
    def write(self, state: DecodeCache, j: int, colour: int, values: torch.Tensor) -> None:
        """Sub-pixel (current row, j, colour) of every image is `values` (B,) from now on."""
        with exact_execution():
            self.decoder.write(self.impl.row_state(state), j, colour, values)


class StaticRows:
    """A row's per-pixel loop on static buffers, one set per batch bucket (1, 2, 4, ... 64).

    A batch of B images runs in the smallest bucket >= B; the extra slots decode harmless padding
    (zero features, uniforms of 0.5) that nobody reads. The gated model's per-pixel step only touches the
    horizontal buffers (zeroed at each row start) and the row's per-column biases, so those are all
    that is copied in. With `capture`, each bucket's loop is recorded once as a CUDA graph and replayed.
    The buffers are shared, so decode lanes (threads) take turns: one row at a time runs here.
    """

    def __init__(self, sampler: CachedSampler, capture: bool, buckets: tuple[int, ...]):
        self.sampler = sampler
        self.capture = capture
        self.buckets = buckets
        self.buffers: dict[int, dict] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lock = threading.Lock()

    def run(self, state: DecodeCache, uniforms: torch.Tensor, temperature: torch.Tensor):
        with self.lock:
            return self._run(state, uniforms, temperature)

    def _run(self, state: DecodeCache, uniforms: torch.Tensor, temperature: torch.Tensor):
        b = state.batch
        bucket = next(size for size in self.buckets if size >= b)
        buf = self.prepare(state, bucket)
        graph = self.graphs.get(bucket)
        for static, live in zip(buf["state"].row_bias, state.row_bias):
            static[:b].copy_(live)
        for static in buf["state"].h_buffers:
            static.zero_()
        buf["uniforms"][:b].copy_(uniforms)
        buf["temperature"][:b].copy_(temperature)
        if graph is not None:
            graph.replay()
        else:
            self._body(buf)
        return buf["row"][:b].clone(), buf["log_prob"][:b].clone()

    def prepare(self, state: GatedCache, bucket: int) -> dict:
        """The bucket's buffers (shaped like `state`'s), allocated and, with `capture`, recorded once.
        Recorded before any input is filled in: the warm-up run before capture dirties the buffers."""
        if bucket not in self.buffers:
            self._allocate(state, bucket)
            if self.capture:
                self._record(bucket)
        return self.buffers[bucket]

    def _allocate(self, state: DecodeCache, bucket: int) -> dict:
        def like(t: torch.Tensor) -> torch.Tensor:
            return t.new_zeros((bucket, *t.shape[1:]))

        c, w = self.sampler.config.image_channels, self.sampler.config.width
        device = self.sampler.device
        self.buffers[bucket] = {
            "state": GatedCache(
                labels=like(state.labels),
                vertical=[],
                v_bias=[],
                h_bias=[],
                h_buffers=[like(t) for t in state.h_buffers],
                row_bias=[like(t) for t in state.row_bias],
            ),
            "uniforms": torch.full((bucket, c, w), 0.5, dtype=torch.float64, device=device),
            "temperature": torch.ones((bucket, 1), dtype=torch.float64, device=device),
            "row": torch.zeros((bucket, c, w), dtype=torch.long, device=device),
            "log_prob": torch.zeros(bucket, dtype=torch.float64, device=device),
        }
        return self.buffers[bucket]

    def _body(self, buf: dict) -> None:
        buf["log_prob"].zero_()
        self.sampler.decode_pixels(buf["state"], buf["uniforms"], buf["temperature"], buf["row"], buf["log_prob"])

    def _record(self, bucket: int) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (as CUDA graph capture requires), then capture the loop."""
        buf = self.buffers[bucket]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body(buf)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (another model's lanes, /likelihood) cannot break it.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._body(buf)
        self.graphs[bucket] = graph
        return graph


def iter_sample(
    model: nn.Module,
    n: int = 1,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    known: torch.Tensor | None = None,
    known_rows: int = 0,
    sampler: CachedSampler | None = None,
    label_mode: str = "posterior",
) -> Iterator[tuple[int, torch.Tensor] | SampleResult]:
    """Yield (row index, uint8 row (n, C, W)) as each row is final, then the SampleResult.

    Same protocol (and so the same images) as app.model.sample_naive."""
    config = model.config
    sampler = sampler or CachedSampler(model)
    streams, labels, canvas, infer = start_sampling(
        config, n, labels, temperature, seed, known, known_rows, sampler.device, label_mode
    )
    class_log_probs = None
    if infer:
        labels, class_log_probs = infer_labels(model, streams, canvas, known_rows)
    state = sampler.prefill(canvas, labels, known_rows)
    temperatures = torch.full((n, 1), float(temperature), dtype=torch.float64)
    log_prob = torch.zeros(n, dtype=torch.float64, device=sampler.device)
    for i in range(known_rows, config.height):
        uniforms = row_uniforms(streams, config.image_channels, config.width)
        row, lp = sampler.decode_row(state, uniforms, temperatures)
        canvas[:, :, i] = row
        log_prob += lp
        yield i, row.to(torch.uint8).cpu()
    yield SampleResult(canvas.to(torch.uint8).cpu(), labels, log_prob.cpu(), class_log_probs)


def sample_cached(model: nn.Module, n: int = 1, **kwargs) -> SampleResult:
    """Cached sampling to completion; keyword arguments as iter_sample."""
    *_, result = iter_sample(model, n, **kwargs)
    return result
