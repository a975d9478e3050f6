"""Wavefront decoding: the rows of the same images drawn by several threads at once, for latency when a
request has fewer images than there are idle cores (above all one image).

Pixel (r, j) of a PixelCNN depends on row r - 1 only up to a bounded column j + reach (`reach`), so row r
can start once row r - 1 has drawn reach + 1 pixels: with two threads a 28 x 28 image of the shipped gated
model takes about 27 * 16 + 28 = 460 sequential pixel steps instead of 784. Each thread runs the one-lane
kernel's own code for its row's pixels and its vertical stack (row_kernels.c, gated_wavefront), so the
images are the same bytes as on one lane (tests/test_wavefront.py).

The engine uses it for a lane whose batch is one request while nothing waits and the other lanes are idle
(scheduler.Engine._wavefront_lanes); a request arriving meanwhile sets `stop`, the threads finish the rows
they are on, and the lanes go back to batching (throughput first under load).
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import torch

from app.model import ModelConfig

from .c_kernel import NativeGatedDecoder, NativeGatedVertical, _pointers
from .cache import GatedCache
from .row_loops import CKernelRows, RowLoop

# Vertical columns computed together (a block shares each weight read; the row below then starts that many
# columns later): 2 measured best for the shipped model on an Intel Xeon (see BENCHMARKS.md).
COLUMN_GROUP = 2


def gated_reach(config: ModelConfig) -> int:
    """How far to the right pixel (r, j) of a gated model reads row r - 1: the first layer's vertical
    kernel reads row r - 1 up to first_kernel_size // 2 columns right, and each later layer's vertical
    kernel (kernel_size wide, over the layer below at the same row) adds kernel_size // 2 more. The
    horizontal stack reads only row r."""
    return config.first_kernel_size // 2 + (config.layers - 1) * (config.kernel_size // 2)


def useful_lanes(config: ModelConfig, reach: int, group: int) -> int:
    """Rows that can be in flight at once: row r starts reach + group pixels after row r - 1."""
    return max(1, math.ceil(config.width / (reach + group)))


class Wavefront:
    """gated_wavefront of the C kernel for a CachedSampler's C row loop (gated models only)."""

    def __init__(self, row_loop: CKernelRows, group: int = COLUMN_GROUP) -> None:
        if not isinstance(row_loop.pixels, NativeGatedDecoder) or not isinstance(
            row_loop.vertical, NativeGatedVertical
        ):
            raise TypeError("wavefront decoding needs the C kernel of a gated model")
        self.config: ModelConfig = row_loop.impl.config
        self.pixels, self.vertical = row_loop.pixels, row_loop.vertical
        self.library = row_loop.pixels._library
        self.group = group
        self.reach = gated_reach(self.config)
        self.useful_lanes = useful_lanes(self.config, self.reach, group)

    @staticmethod
    def for_row_loop(row_loop: RowLoop) -> Wavefront | None:
        """The wavefront of this row loop, or None where there is none (TorchScript, masked convolutions)."""
        if isinstance(row_loop, CKernelRows) and isinstance(row_loop.pixels, NativeGatedDecoder):
            return Wavefront(row_loop)
        return None

    def decode(
        self,
        state: GatedCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        lanes: int,
        stop: ctypes.c_int32 | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the next rows of every image of `state` (all at the same row) on `lanes` threads.

        uniforms float64 (R, B, C, W): row k's uniforms; temperature (B, 1). Returns values int64 (R', B, C, W)
        and each row's log p (R', B) float64 for the R' <= R rows drawn (fewer once `stop` is set); `state`
        moves on to row R'. The values are those of R' calls of CachedSampler.decode_row."""
        rows, batch = uniforms.shape[0], uniforms.shape[1]
        kept = [t for layer in state.vertical for t in layer]
        if not all(t.is_contiguous() and t.dtype == torch.float32 for t in kept + state.v_bias + state.h_bias):
            raise ValueError("wavefront decoding needs contiguous float32 caches")
        uniforms = uniforms.to(torch.float64).contiguous()
        temperature = temperature.to(torch.float64).reshape(-1).contiguous()
        values = torch.zeros((rows, batch, self.config.image_channels, self.config.width), dtype=torch.long)
        log_prob = torch.zeros((rows, batch), dtype=torch.float64)
        drawn = self.library.gated_wavefront(
            ctypes.byref(self.pixels._weights),
            ctypes.byref(self.vertical._weights),
            batch,
            rows,
            lanes,
            self.group,
            self.reach,
            _pointers(kept),
            _pointers(state.v_bias),
            _pointers(state.h_bias),
            uniforms.data_ptr(),
            temperature.data_ptr(),
            values.data_ptr(),
            log_prob.data_ptr(),
            None if stop is None else ctypes.addressof(stop),
        )
        if drawn < 0:
            raise MemoryError("wavefront decoding could not allocate its buffers")
        return values[:drawn], log_prob[:drawn]


def uniforms_ahead(streams: list[np.random.Generator], rows: int, channels: int, width: int) -> torch.Tensor:
    """The uniforms of the next `rows` rows of these images, float64 (rows, n, C, W): the same numbers as
    `rows` calls of protocol.row_uniforms (each stream's doubles in order)."""
    return torch.from_numpy(np.stack([stream.random((rows, channels, width)) for stream in streams], axis=1))


def rewind(streams: list[np.random.Generator], states: list[dict], rows: int, channels: int, width: int) -> None:
    """Put the streams back where they were (`states`) and then past `rows` rows: what they would be had only
    those rows' uniforms been drawn."""
    for stream, saved in zip(streams, states):
        stream.bit_generator.state = saved
        stream.random((rows, channels, width))
