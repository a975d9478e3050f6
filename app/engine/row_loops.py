"""The row loops: how a row is drawn once its caches are prefilled, and the batch padding each needs.

A row loop does the per-row work (`begin_row`: the gated model's vertical stack; `end_row`: the drawn row
joins the caches) and the per-sub-pixel loop (`fill_row`), and declares the batch sizes at which its
numbers are the same for an image whatever else shares the step (`batch_quantum`, `min_batch`: see
CachedSampler.padded_batch). CachedSampler picks one from ROW_LOOPS, the first that can run:

- c-kernel: float32 on the CPU, when the kernel builds. Per-row work and per-pixel loop in C (c_kernel.py),
  each image on its own: no padding.
- torch: everything else (float64, CUDA, no compiler, native=False). The torch per-row methods and the
  TorchScript (or eager) row decoder: steps padded to at least 2 images and whole 32-float chunks, and to
  64 images on CUDA (TorchRows says why).

and, for gated models on CUDA (or when asked, for testing), wraps it in StaticRows: the per-pixel loop
on static buffers of fixed batch buckets, each captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .c_kernel import NativeGatedDecoder, NativeGatedVertical, NativePixelCNNDecoder
from .c_library import NUMERICS_VERSION, load_kernel
from .cache import DecodeCache, GatedCache
from .cached_models import CachedGated, CachedPixelCNN

CUDA_BATCH = 64  # on CUDA every decode step runs at this batch size (one fixed shape, one kernel choice)


def exact_execution() -> AbstractContextManager[None]:
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


class RowLoop:
    """Draws one row of every image of a batch after prefill. Subclasses set `name`, their padding rule
    (`batch_quantum`, `min_batch`) and `fill_row`."""

    name: str
    batch_quantum: int  # a step runs at a multiple of this many images
    min_batch: int  # and at least this many

    def __init__(self, impl: CachedGated | CachedPixelCNN, device: torch.device) -> None:
        self.impl = impl
        self.device = device

    @property
    def numerics(self) -> str:
        """Which arithmetic draws the images, and whether its numbers are the same bits on every machine
        ("portable") or only on this one ("local"): a client replaying a seed elsewhere compares these."""
        dtype = str(self.impl.decoder.head.hidden_w.dtype).removeprefix("torch.")
        return f"{self.name}/{self.device.type}/{dtype}; local"

    def prefill(self, canvas: torch.Tensor, labels: torch.Tensor | None, known_rows: int) -> DecodeCache:
        """Caches for decoding row `known_rows` onwards, by the cached model's torch prefill. One image at a
        time when rows are known: the convolutions over them round by batch size, and an image's caches must
        not depend on its request's size. With none known the caches are zeros and class biases (a lookup
        and exact products), the same numbers for any batch, so the whole batch is prefilled at once."""
        if known_rows == 0:
            return self.impl.prefill(canvas, labels, 0)
        caches = [
            self.impl.prefill(canvas[i : i + 1], None if labels is None else labels[i : i + 1], known_rows)
            for i in range(canvas.shape[0])
        ]
        return DecodeCache.concat(caches)

    def begin_row(self, state: DecodeCache) -> None:
        self.impl.begin_row(state)

    def end_row(self, state: DecodeCache, row: torch.Tensor) -> None:
        self.impl.end_row(state, row)

    def fill_row(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        row: torch.Tensor,
        log_prob: torch.Tensor,
        forced: torch.Tensor | None = None,
    ) -> None:
        """The per-sub-pixel loop of one row, writing into `row` and adding to `log_prob` in place; `forced`
        int64 (B, C, W): values >= 0 are kept sub-pixels, written instead of drawn (protocol step 3)."""
        raise NotImplementedError

    def draw_row(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        forced: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-sub-pixel loop into new tensors: values int64 (B, C, W), log p (B,) float64."""
        config = self.impl.config
        row = torch.empty((state.batch, config.image_channels, config.width), dtype=torch.long, device=self.device)
        log_prob = torch.zeros(state.batch, dtype=torch.float64, device=self.device)
        forced = None if forced is None else forced.to(self.device)
        self.fill_row(state, uniforms.to(self.device), temperature.to(self.device), row, log_prob, forced)
        return row, log_prob

    def prepare(self) -> None:
        """Work done once before serving (capturing CUDA graphs); nothing by default."""


class CKernelRows(RowLoop):
    """Float32 on the CPU: the per-pixel loop in C (c_kernel.py), and for a gated model its vertical stack
    (`vertical`, NativeGatedVertical) too. The C code computes every image on its own in its written order,
    so no step needs padding: there is no matrix product whose kernel depends on the batch, and no torch
    elementwise op left whose vectorised tail could round an image differently."""

    name = "c-kernel"
    batch_quantum = 1
    min_batch = 1

    def __init__(self, impl: CachedGated | CachedPixelCNN, library: ctypes.CDLL, device: torch.device) -> None:
        super().__init__(impl, device)
        config = impl.config
        self.pixels: NativeGatedDecoder | NativePixelCNNDecoder
        self.vertical: NativeGatedVertical | None = None
        if isinstance(impl, CachedGated):
            self.pixels = NativeGatedDecoder(library, impl.decoder, config.width, config.image_channels)
            self.vertical = NativeGatedVertical(library, impl)
        else:
            self.pixels = NativePixelCNNDecoder(library, impl.decoder, config.width, config.image_channels)

    @property
    def numerics(self) -> str:
        return f"c-kernel/{NUMERICS_VERSION}; portable"

    def prefill(self, canvas: torch.Tensor, labels: torch.Tensor | None, known_rows: int) -> DecodeCache:
        """The known rows through the kernel, row by row, as if they had been drawn (the gated model: its
        vertical stack; the masked-conv one: every sub-pixel, forced to its known value), not through torch's
        convolutions, whose rounding depends on the CPU: the caches hold the numbers decoding would leave,
        the same bits on every machine and for any batch, so the whole batch is prefilled at once."""
        # No row known yet: zeros and class biases, exact (the gated model's kept rows in the kernel's layout).
        b = canvas.shape[0]
        state = self.impl.prefill(canvas, labels, 0) if self.vertical is None else self.vertical.empty_cache(labels, b)
        c, w = canvas.shape[1], canvas.shape[3]
        uniforms = torch.zeros((b, c, w), dtype=torch.float64)  # ignored: every sub-pixel is forced
        temperature = torch.ones((b, 1), dtype=torch.float64)
        for i in range(known_rows):
            known = canvas[:, :, i]
            self.begin_row(state)
            if self.vertical is None:  # the gated model's next rows see only its vertical stack
                self.draw_row(state, uniforms, temperature, forced=known)
            self.end_row(state, known)
        return state

    def begin_row(self, state: DecodeCache) -> None:
        (self.vertical or self.impl).begin_row(state)

    def end_row(self, state: DecodeCache, row: torch.Tensor) -> None:
        (self.vertical or self.impl).end_row(state, row)

    def fill_row(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        row: torch.Tensor,
        log_prob: torch.Tensor,
        forced: torch.Tensor | None = None,
    ) -> None:
        self.pixels(self.impl.row_state(state), uniforms, temperature, row, log_prob, forced)


class TorchRows(RowLoop):
    """The readable reference: the torch per-row methods and the row decoder, TorchScript-compiled (or
    eager with compiled=False). Every reduction is a matrix product in which each image is one row of the
    left operand, and the batch is padded (with copies of its first image) to a size where that holds bit
    for bit:
    - CPU (MKL): a product with one row takes another kernel (gemv) than one with two or more, whose
      rows are all summed alike; so at least 2 images.
    - Elementwise ops vectorise in chunks of 32 floats and finish a tensor's odd tail with scalar code
      that rounds transcendental functions differently; so a multiple of the cached model's
      `batch_quantum` images, which makes each image's share of a gated pre-activation whole chunks.
    - CUDA: cuBLAS chooses kernels by shape, so every step runs at CUDA_BATCH images (TF32 is off, see
      app.model.load)."""

    def __init__(self, impl: CachedGated | CachedPixelCNN, decoder: nn.Module, device: torch.device) -> None:
        super().__init__(impl, device)
        self.decoder = decoder
        self.name = "torchscript" if isinstance(decoder, torch.jit.ScriptModule) else "eager"
        if device.type == "cuda":
            self.batch_quantum, self.min_batch = CUDA_BATCH, CUDA_BATCH
        else:
            self.batch_quantum, self.min_batch = impl.batch_quantum, 2

    def fill_row(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        row: torch.Tensor,
        log_prob: torch.Tensor,
        forced: torch.Tensor | None = None,
    ) -> None:
        with exact_execution():
            self.decoder(self.impl.row_state(state), uniforms, temperature, row, log_prob, forced)


class StaticRows(RowLoop):
    """Another row loop's per-pixel loop on static buffers, one set per batch bucket (`buckets`), with
    its per-row work and padding unchanged.

    A batch of B images runs in the smallest bucket >= B (a larger batch runs the wrapped loop directly);
    the extra slots decode harmless padding (zero features, uniforms of 0.5) that nobody reads. The gated
    model's per-pixel step only touches the horizontal buffers (zeroed at each row start) and the row's
    per-column biases, so those are all that is copied in. With `capture`, each bucket's loop is recorded
    once as a CUDA graph (`prepare`, before serving) and replayed: a row costs one graph launch instead of
    ~20 kernel launches per layer per pixel. The buffers are shared, so decode lanes (threads) take
    turns: one row at a time runs here.
    """

    def __init__(self, inner: RowLoop, capture: bool, buckets: tuple[int, ...]) -> None:
        super().__init__(inner.impl, inner.device)
        self.inner = inner
        self.name = "cuda-graph" if capture else f"static-{inner.name}"
        self.batch_quantum, self.min_batch = inner.batch_quantum, inner.min_batch
        self.capture = capture
        self.buckets = buckets
        self.buffers: dict[int, dict] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lock = threading.Lock()

    @property
    def numerics(self) -> str:
        return self.inner.numerics  # the same kernels, replayed

    def prefill(self, canvas: torch.Tensor, labels: torch.Tensor | None, known_rows: int) -> DecodeCache:
        return self.inner.prefill(canvas, labels, known_rows)

    def begin_row(self, state: DecodeCache) -> None:
        self.inner.begin_row(state)

    def end_row(self, state: DecodeCache, row: torch.Tensor) -> None:
        self.inner.end_row(state, row)

    def fill_row(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        row: torch.Tensor,
        log_prob: torch.Tensor,
        forced: torch.Tensor | None = None,
    ) -> None:
        self.inner.fill_row(state, uniforms, temperature, row, log_prob, forced)

    def draw_row(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        forced: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A row with kept sub-pixels (a completion's first row, once per such request) runs the wrapped
        # loop directly: the recorded graphs know no forced values, and the wrapped loop at the same
        # padded batch computes the same numbers.
        if state.batch > self.buckets[-1] or forced is not None:
            return self.inner.draw_row(state, uniforms, temperature, forced)
        with self.lock:
            return self._run(state, uniforms, temperature)

    @torch.no_grad()
    def prepare(self) -> None:
        """Record the CUDA graph of every bucket now (the engine does this before it serves)."""
        if not self.capture:
            return
        config = self.impl.config
        for bucket in self.buckets:
            canvas = torch.zeros((bucket, *config.shape), dtype=torch.long, device=self.device)
            labels = torch.zeros(bucket, dtype=torch.long, device=self.device) if config.conditional else None
            state = self.impl.prefill(canvas, labels, 0)
            self.impl.begin_row(state)
            self.buffers_for(state, bucket)

    def _run(
        self, state: DecodeCache, uniforms: torch.Tensor, temperature: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = state.batch
        bucket = next(size for size in self.buckets if size >= b)
        buf = self.buffers_for(state, bucket)
        graph = self.graphs.get(bucket)
        live_state = cast(GatedCache, state)
        for static, live in zip(buf["state"].row_bias, live_state.row_bias):
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

    def buffers_for(self, state: DecodeCache, bucket: int) -> dict:
        """The bucket's buffers (shaped like `state`'s), allocated and, with `capture`, recorded once.
        Recorded before any input is filled in: the warm-up run before capture dirties the buffers."""
        if bucket not in self.buffers:
            self._allocate(state, bucket)
            if self.capture:
                self._record(bucket)
        return self.buffers[bucket]

    def _allocate(self, live: DecodeCache, bucket: int) -> dict:
        state = cast(GatedCache, live)

        def like(t: torch.Tensor) -> torch.Tensor:
            return t.new_zeros((bucket, *t.shape[1:]))

        c, w = self.impl.config.image_channels, self.impl.config.width
        device = self.device
        self.buffers[bucket] = {
            "state": GatedCache(
                labels=like(state.labels),
                vertical=[],
                v_bias=[],
                h_bias=[],
                h_buffers=[like(t) for t in state.h_buffers],
                row_bias=[like(t) for t in cast(list[torch.Tensor], state.row_bias)],  # after begin_row
            ),
            "uniforms": torch.full((bucket, c, w), 0.5, dtype=torch.float64, device=device),
            "temperature": torch.ones((bucket, 1), dtype=torch.float64, device=device),
            "row": torch.zeros((bucket, c, w), dtype=torch.long, device=device),
            "log_prob": torch.zeros(bucket, dtype=torch.float64, device=device),
        }
        return self.buffers[bucket]

    def _body(self, buf: dict) -> None:
        buf["log_prob"].zero_()
        self.inner.fill_row(buf["state"], buf["uniforms"], buf["temperature"], buf["row"], buf["log_prob"])

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


@dataclass(frozen=True)
class Target:
    """What a row loop is chosen for: the cached model, its (compiled) decoder, where and in which dtype
    it runs, and the caller's switches (compiled=False: eager; native=False: never the C kernel)."""

    impl: CachedGated | CachedPixelCNN
    decoder: nn.Module
    device: torch.device
    dtype: torch.dtype
    compiled: bool
    native: bool


def _c_kernel(target: Target) -> RowLoop | None:
    if not (target.native and target.compiled and target.device.type == "cpu" and target.dtype == torch.float32):
        return None
    library = load_kernel()  # None without a compiler, when the build fails or PIXELCNN_NATIVE_KERNEL=0
    return None if library is None else CKernelRows(target.impl, library, target.device)


def _torch(target: Target) -> RowLoop:
    return TorchRows(target.impl, target.decoder, target.device)


# The row loops, in order of preference: the first that returns one runs.
ROW_LOOPS: tuple[tuple[str, Callable[[Target], RowLoop | None]], ...] = (
    ("c-kernel", _c_kernel),
    ("torch", _torch),
)
STATIC_BUCKETS = {"cuda": (CUDA_BATCH,), "cpu": (2, 4, 8, 16, 32, 64)}


def choose_row_loop(target: Target, static_rows: bool | None) -> RowLoop:
    """The first row loop of ROW_LOOPS that runs here; for a gated model wrapped in StaticRows when
    `static_rows` (by default on CUDA only: elsewhere the copies cost more than they save, but it can be
    forced for testing the same code path eagerly)."""
    loop = next(loop for _, build in ROW_LOOPS if (loop := build(target)) is not None)
    on_cuda = target.device.type == "cuda"
    if static_rows is None:
        static_rows = on_cuda
    if static_rows and isinstance(target.impl, CachedGated):
        return StaticRows(loop, capture=on_cuda, buckets=STATIC_BUCKETS["cuda" if on_cuda else "cpu"])
    return loop
