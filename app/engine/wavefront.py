"""Wavefront decoding: the rows of the same images drawn by several threads at once, for latency when a
request has fewer images than there are idle cores (above all one image).

Pixel (r, j) of a PixelCNN depends on row r - 1 only up to a bounded column j + reach (`gated_reach`,
`masked_conv_reach`), so row r can start once row r - 1 has drawn reach + 1 pixels: with two threads a
28 x 28 image of the shipped gated model (reach 15) takes about 27 * 16 + 28 = 460 sequential pixel steps
instead of 784; the masked-conv model (reach 3) keeps up to 7 rows in flight. Each thread runs the one-lane
kernel's own code for its row's pixels and (gated) its vertical stack (row_kernels.c, gated_wavefront,
pixelcnn_wavefront), so the images are the same bytes as on one lane (tests/test_wavefront.py).

The engine uses it for a lane whose batch is one request while nothing waits and the other lanes are idle
(scheduler.Engine._wavefront_lanes); a request arriving meanwhile sets `stop`, the threads finish the rows
they are on, and the lanes go back to batching (throughput first under load). A streamed request takes its
rows as each is complete (Wavefront.decode_rows), while the later ones are drawn.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.model import ModelConfig
from app.model.sampling import Samples

from .c_kernel import NativeGatedDecoder, _pointers
from .cache import DecodeCache, GatedCache, PixelCNNCache
from .cached_models import CachedGated, CachedPixelCNN
from .protocol import start_sampling
from .row_loops import CKernelRows, RowLoop

if TYPE_CHECKING:  # cached.py draws its rows through this module's decode
    from .cached import CachedSampler

# Vertical columns computed together (a block shares each weight read; the row below then starts that many
# columns later). For the shipped model on an Intel Xeon, one image on one thread costs 40.5 / 25.4 / 20.5 /
# 18.5 ms of CPU with groups of 1 / 2 / 4 / 8 (one column streams all 2 MB of vertical weights from L2), and
# the schedule takes 460 / 487 / 541 / 649 of 784 pixel steps: 4 is the best product (see BENCHMARKS.md).
COLUMN_GROUP = 4


def gated_reach(config: ModelConfig) -> int:
    """How far to the right pixel (r, j) of a gated model reads row r - 1: the first layer's vertical
    kernel reads row r - 1 up to first_kernel_size // 2 columns right, and each later layer's vertical
    kernel (kernel_size wide, over the layer below at the same row) adds kernel_size // 2 more. The
    horizontal stack reads only row r."""
    return config.first_kernel_size // 2 + (config.layers - 1) * (config.kernel_size // 2)


def masked_conv_reach(config: ModelConfig) -> int:
    """The same for the masked-conv PixelCNN, counted in the row above's steps: the input convolution reads
    its pixels up to first_kernel_size // 2 columns right, and each block's convolution reads its reduced
    features up to kernel_size // 2 columns right, which that row writes at that column's step. What those
    features depend on in that row lies left of their column (the masks), so the reach is the widest half
    kernel, not a sum (the pixels themselves reach one column less through the blocks: mask A)."""
    return max(config.first_kernel_size, config.kernel_size) // 2


def balanced_split(impl: CachedGated | CachedPixelCNN) -> int:
    """Where to split a gated model's work between two threads by role: the vertical stack's first layers on
    one, its other layers and the per-pixel loop on the other, chosen by multiply-adds per column: the most
    layers whose products do not outweigh the other thread's, counting the per-pixel loop's twice (one
    image's matrix-vector products stream their weights at about half the rate of the vertical stack's
    column blocks: measured on an Intel Xeon, BENCHMARKS.md). A starting point: the engine measures its
    neighbours at start (Wavefront.tune). 0 (by rows) for the masked-conv model."""
    if not isinstance(impl, CachedGated):
        return 0
    vertical = [sum(w.numel() for w in rows) + link.numel() for rows, link in zip(impl.v_weight, impl.link_weight)]
    decoder = impl.decoder
    pixels = impl.config.image_channels * (
        sum(
            w.numel() for w in [*decoder.h_weight, *decoder.out_weight, decoder.head.hidden_w, decoder.head.logits_w[0]]
        )
    )
    fits = [s for s in range(1, len(vertical) + 1) if sum(vertical[:s]) <= sum(vertical[s:]) + 2 * pixels]
    return max(fits, default=1)


class Wavefront:
    """The C kernel's wavefront decoding (gated_wavefront or pixelcnn_wavefront) for a CachedSampler's C
    row loop."""

    def __init__(self, row_loop: CKernelRows, group: int = COLUMN_GROUP) -> None:
        self.config: ModelConfig = row_loop.impl.config
        self.impl = row_loop.impl
        self.pixels, self.vertical = row_loop.pixels, row_loop.vertical
        self.library = row_loop.pixels._library
        self.gated = isinstance(row_loop.pixels, NativeGatedDecoder)
        # Columns a row starts after the row above: the reach, and for a gated model its column groups.
        self.group = group if self.gated else 1
        self.reach = gated_reach(self.config) if self.gated else masked_conv_reach(self.config)
        # Two threads on a gated model: layers 0 .. split - 1 of the vertical stack on one, the rest of it
        # and the pixels on the other (0: by rows, as for more threads). The engine measures the best at start.
        self.split = balanced_split(self.impl)

    def split_candidates(self, lanes: int) -> list[int]:
        """The splits worth measuring on `lanes` threads: by rows (0), and on two threads of a gated model
        also the balanced split and its neighbours."""
        if lanes != 2 or not self.gated:
            return [self.split]
        balanced = balanced_split(self.impl)
        return [0, *range(max(1, balanced - 1), min(self.config.layers, balanced + 1) + 1)]

    def tune(
        self, sampler: CachedSampler, lanes: int, rounds: int = 5, baseline: Callable[[], object] | None = None
    ) -> tuple[float, float | None]:
        """Measure one image by each candidate split (`rounds` interleaved runs, with `baseline`'s if given)
        and keep the fastest: it depends on the CPU's caches. Returns the best time of the kept split and of
        the baseline. The images are the same bytes whatever is picked."""
        times: dict[int, list[float]] = {split: [] for split in self.split_candidates(lanes)}
        baseline_times = []
        for _ in range(rounds):
            if baseline is not None:
                started = time.perf_counter()
                baseline()
                baseline_times.append(time.perf_counter() - started)
            for split, split_times in times.items():
                self.split = split
                started = time.perf_counter()
                sample_wavefront(sampler, 1, lanes=lanes, decoder=self)
                split_times.append(time.perf_counter() - started)
        self.split = min(times, key=lambda split: min(times[split]))
        return min(times[self.split]), min(baseline_times) if baseline_times else None

    def describe(self, lanes: int) -> str:
        """How `lanes` threads share the work, for logs and benchmarks."""
        if lanes == 2 and self.split:
            return f"vertical stack layers 0-{self.split - 1} on one thread, the rest on the other"
        return "by rows"

    @property
    def useful_lanes(self) -> int:
        """Rows that can be in flight at once: row r starts reach + group pixels after row r - 1."""
        return max(1, math.ceil(self.config.width / (self.reach + self.group)))

    @staticmethod
    def for_row_loop(row_loop: RowLoop) -> Wavefront | None:
        """The wavefront of this row loop, or None where there is none (the torch row loops)."""
        return Wavefront(row_loop) if isinstance(row_loop, CKernelRows) else None

    def decode(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        lanes: int,
        stop: ctypes.c_int32 | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the next rows of every image of `state` (all at the same row) on `lanes` threads; on one, in
        one call of the kernel rather than one per row (no per-row trip through Python).

        uniforms float64 (R, B, C, W): row k's uniforms; temperature (B, 1). Returns values int64 (R', B, C, W)
        and each row's log p (R', B) float64 for the R' <= R rows drawn (fewer once `stop` is set); `state`
        moves on to row R'. The values are those of R' calls of CachedSampler.decode_row."""
        call = self._prepare(state, uniforms, temperature, lanes, stop)
        drawn = call.run()
        return call.values[:drawn], call.log_prob[:drawn]

    def decode_rows(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        lanes: int,
        stop: ctypes.c_int32 | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """decode's rows as each is complete, while the later ones are drawn: (values (B, C, W) int64,
        log p (B,) float64) of row 0, 1, ... (a streamed request's rows reach its client as they come, not
        when the last is drawn). The kernel runs on a thread of its own (its `lanes` threads), this one
        sleeps until a row is complete. `stop` ends the call sooner, as closing the iteration early does
        (after the rows in flight); `state` has moved on past the rows taken once the iteration ends."""
        stop = ctypes.c_int32(0) if stop is None else stop
        call = self._prepare(state, uniforms, temperature, lanes, stop)
        rows_done = ctypes.c_int32(0)
        outcome: list[int | BaseException] = []

        def run() -> None:
            try:
                outcome.append(call.run(rows_done))
            except BaseException as error:  # raised below, in the caller's thread
                outcome.append(error)
            finally:  # whatever happened: the waiting loop below ends
                self.library.wavefront_rows_publish(ctypes.addressof(rows_done), rows_done.value | _CALL_ENDED)

        thread = threading.Thread(target=run, name="pixelcnn-wavefront", daemon=True)
        thread.start()
        taken, seen = 0, 0
        try:
            while not seen & _CALL_ENDED:
                seen = self.library.wavefront_rows_wait(ctypes.addressof(rows_done), seen, _WAIT_US)
                for k in range(taken, seen & ~_CALL_ENDED):
                    yield call.values[k], call.log_prob[k]
                taken = seen & ~_CALL_ENDED  # the count only rises (row_kernels.c, publish)
        except BaseException:  # closed early, or the caller's loop failed: no further row starts
            stop.value = 1
            raise
        finally:
            thread.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        if taken != outcome[0]:  # every row the call drew was counted complete before it returned
            raise RuntimeError(f"wavefront decoding drew {outcome[0]} rows but reported {taken} complete")

    def _prepare(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        lanes: int,
        stop: ctypes.c_int32 | None,
    ) -> _KernelCall:
        caches = (
            [t for layer in state.vertical for t in layer] + state.v_bias + state.h_bias
            if isinstance(state, GatedCache)
            else [state.inputs, state.input_bias, *state.conv_inputs]
            if isinstance(state, PixelCNNCache)
            else []
        )
        if not caches or not all(t.is_contiguous() and t.dtype == torch.float32 for t in caches):
            raise ValueError("wavefront decoding needs contiguous float32 caches (it writes into them in place)")
        if self.gated and not 0 <= self.split <= self.config.layers:
            raise ValueError(
                f"split must be 0 (by rows) to {self.config.layers} (the model's vertical layers), not {self.split}"
            )
        if not isinstance(state, GatedCache | PixelCNNCache) or (
            isinstance(state, GatedCache) and self.vertical is None
        ):
            raise TypeError(f"no wavefront decoding of a {type(state).__name__} with this kernel")
        return _KernelCall(self, state, uniforms, temperature, lanes, stop)


# The bit a decode_rows call's thread sets in its rows count once the kernel has returned.
_CALL_ENDED = 1 << 30
# How long decode_rows sleeps at most before looking at the count again (each complete row wakes it).
_WAIT_US = 50_000


class _KernelCall:
    """One call of gated_wavefront or pixelcnn_wavefront, its arguments checked (Wavefront._prepare) and its
    outputs allocated: values int64 (R, B, C, W), log p (R, B)."""

    def __init__(
        self,
        wavefront: Wavefront,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        lanes: int,
        stop: ctypes.c_int32 | None,
    ) -> None:
        rows, batch = uniforms.shape[0], uniforms.shape[1]
        config = wavefront.config
        self.wavefront, self.state, self.lanes, self.stop = wavefront, state, lanes, stop
        self.rows, self.batch = rows, batch
        self.uniforms = uniforms.to(torch.float64).contiguous()
        self.temperature = temperature.to(torch.float64).reshape(-1).contiguous()
        self.values = torch.zeros((rows, batch, config.image_channels, config.width), dtype=torch.long)
        self.log_prob = torch.zeros((rows, batch), dtype=torch.float64)

    def run(self, rows_done: ctypes.c_int32 | None = None) -> int:
        """The kernel's call; the rows drawn. `rows_done` (if given) rises as rows complete."""
        w, state = self.wavefront, self.state
        outputs = (
            self.uniforms.data_ptr(),
            self.temperature.data_ptr(),
            self.values.data_ptr(),
            self.log_prob.data_ptr(),
            None if self.stop is None else ctypes.addressof(self.stop),
            None if rows_done is None else ctypes.addressof(rows_done),
        )
        if isinstance(state, GatedCache):
            assert w.vertical is not None  # Wavefront._prepare
            drawn = w.library.gated_wavefront(
                ctypes.byref(w.pixels._weights),
                ctypes.byref(w.vertical._weights),
                self.batch,
                self.rows,
                self.lanes,
                w.group if self.lanes > 1 else w.config.width,  # one thread: each vertical layer's row at once
                w.split if self.lanes == 2 else 0,  # by role on two threads, else by rows
                _pointers([t for layer in state.vertical for t in layer]),
                _pointers(state.v_bias),
                _pointers(state.h_bias),
                *outputs,
            )
        else:
            assert isinstance(state, PixelCNNCache)  # Wavefront._prepare
            drawn = w.library.pixelcnn_wavefront(
                ctypes.byref(w.pixels._weights),
                self.batch,
                self.rows,
                self.lanes,
                state.inputs.data_ptr(),
                state.input_bias.data_ptr(),
                _pointers(state.conv_inputs),
                *outputs,
            )
        if drawn < 0:
            raise MemoryError("wavefront decoding could not allocate its buffers")
        return drawn


def uniforms_ahead(streams: list[np.random.Generator], rows: int, channels: int, width: int) -> torch.Tensor:
    """The uniforms of the next `rows` rows of these images, float64 (rows, n, C, W): the same numbers as
    `rows` calls of protocol.row_uniforms (each stream's doubles in order)."""
    return torch.from_numpy(np.stack([stream.random((rows, channels, width)) for stream in streams], axis=1))


def rewind(
    streams: list[np.random.Generator], states: list[Mapping[str, Any]], rows: int, channels: int, width: int
) -> None:
    """Put the streams back where they were (`states`) and then past `rows` rows: what they would be had only
    those rows' uniforms been drawn."""
    for stream, saved in zip(streams, states):
        stream.bit_generator.state = saved
        stream.random((rows, channels, width))


def sample_wavefront(
    sampler: CachedSampler,
    n: int = 1,
    seed: int = 0,
    lanes: int = 2,
    temperature: float = 1.0,
    decoder: Wavefront | None = None,
) -> Samples:
    """Sample n images (no known rows, labels drawn as the protocol says) by wavefront decoding on `lanes`
    threads (with `decoder`'s settings, else the defaults): the images, labels and log p of
    cached.sample_cached with the same sampler and seed."""
    config = sampler.config
    streams, labels, canvas, _ = start_sampling(config, n, None, temperature, seed, None, 0, sampler.device)
    decoder = decoder or Wavefront.for_row_loop(sampler.row_loop)
    if decoder is None:
        raise ValueError(f"no wavefront decoding for the {sampler.row_loop.name} row loop")
    state = sampler.prefill(canvas, labels, 0)
    uniforms = uniforms_ahead(streams, config.height, config.image_channels, config.width)
    temperatures = torch.full((n, 1), float(temperature), dtype=torch.float64)
    values, row_log_probs = decoder.decode(state, uniforms, temperatures, lanes)
    canvas[:] = values.permute(1, 2, 0, 3)  # (H, n, C, W) -> (n, C, H, W)
    log_prob = torch.zeros(n, dtype=torch.float64)
    for row in row_log_probs:  # row by row, as the one-lane sum runs
        log_prob += row
    return Samples(canvas.to(torch.uint8), labels, log_prob)
