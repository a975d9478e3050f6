"""The per-sub-pixel loop of a row as a small C kernel (native/row_kernels.c), built at first use.

At batch 1 a row step in torch is ~50 small ops per sub-pixel whose cost is per-op overhead; the C loop
does the same arithmetic (~150k multiply-adds per pixel for the shipped model) with none. Both
architectures have one (gated_decode_row, pixelcnn_decode_row); the gated model's vertical stack, once per
row (~13M multiply-adds per image for the shipped model, ~130 small torch ops), runs there too
(gated_begin_row, gated_end_row: NativeGatedVertical). It is compiled
once per machine with the system C compiler (`cc`, or $CC) into a cache folder ($PIXELCNN_KERNEL_CACHE,
else ~/.cache/pixelcnn/kernels, else the temp folder), keyed by the source, the flags and the CPU, and
loaded with ctypes, which releases the GIL during the call (the decode lanes run in parallel).

Flags: -O3 -march=native (the kernel is built where it runs), -ffp-contract=off and no -ffast-math, so
every sum runs in the written order with IEEE rounding (its products' running sums as explicit fused
multiply-adds, one rounding each) and an image's numbers never depend on its batch,
on any CPU (a BLAS library picks kernels by shape and CPU: MKL on AMD EPYC rounds a product's rows by
the product's size, which the torch decoders cannot avoid). The vector width -march picks changes the
speed, never a number, and exp and log are the kernel's own, not libm's (chosen per CPU): the kernel's
numbers are the same bits on every x86-64 CPU (NUMERICS_VERSION; README, "Reproducibility across
machines"). A completion's known rows go through it too (row_loops.CKernelRows.prefill).

When there is no compiler, the build fails or PIXELCNN_NATIVE_KERNEL=0, `load_kernel()` returns None
and the engine runs the TorchScript decoder (row_decoders.py), which stays the readable reference; the
two round differently, and torch's numbers depend on the CPU (oneDNN, MKL and ATen pick their code by
it), so seeded images from the fallback are reproducible per machine, not across machines.
"""

from __future__ import annotations

import ctypes
from typing import cast

import torch

from .c_library import GatedVertical, GatedWeights, PixelCNNWeights
from .cache import DecodeCache, GatedCache
from .cached_models import CachedGated
from .row_decoders import GatedRowDecoder, PixelCNNRowDecoder


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def panels(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """A (rows, cols) matrix as the kernel's products read it (row_kernels.c, affine_block): `width` columns
    at a time, each panel's rows one after another, the last panel zero-padded: (ceil(cols / width), rows,
    width)."""
    rows, cols = matrix.shape
    padded = torch.zeros((rows, -(-cols // width) * width), dtype=torch.float32)
    padded[:, :cols] = matrix.detach()
    return padded.reshape(rows, -1, width).permute(1, 0, 2).contiguous()


class NativeDecoder:
    """Calls a C row loop with the weights of a row decoder; called like the decoder's `forward`.

    CPU float32 only. Holds contiguous copies of the weights (the C code reads them by pointer) and the
    ctypes arrays of their addresses."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        self._keep: list[object] = []  # everything the C structure points into

    def _tensors(self, tensors: list[torch.Tensor]) -> ctypes.Array:
        dense = [_dense(t) for t in tensors]
        array = _pointers(dense)
        self._keep += [dense, array]
        return array

    def _tensor(self, tensor: torch.Tensor) -> int:
        dense = _dense(tensor)
        self._keep.append(dense)
        return dense.data_ptr()

    def _matrices(self, matrices: list[torch.Tensor]) -> ctypes.Array:
        """The matrices of the kernel's products, in its panels."""
        width = self._library.kernel_panel_width()
        return self._tensors([panels(m, width) for m in matrices])

    def _matrix(self, matrix: torch.Tensor) -> int:
        return self._tensor(panels(matrix, self._library.kernel_panel_width()))

    def _ints(self, values: list[int]) -> ctypes.Array:
        array = (ctypes.c_int32 * len(values))(*values)
        self._keep.append(array)
        return array

    def _run(self, state: list[torch.Tensor], batch: int, *outputs: int | None) -> int:
        """The C row loop on `batch` images; `outputs`: the addresses of uniforms, temperature, row, log p
        and the forced sub-pixels (None: NULL, none forced)."""
        raise NotImplementedError

    def __call__(
        self,
        state: list[torch.Tensor],
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        row: torch.Tensor,
        log_prob: torch.Tensor,
        forced: torch.Tensor | None = None,
    ) -> None:
        if not all(t.is_contiguous() and t.dtype == torch.float32 for t in state):
            raise ValueError("the native row kernel needs contiguous float32 caches (it writes into them in place)")
        if not (row.is_contiguous() and log_prob.is_contiguous()):
            raise ValueError("the native row kernel needs contiguous outputs")
        uniforms = uniforms.to(torch.float64).contiguous()
        temperature = temperature.to(torch.float64).reshape(-1).contiguous()
        forced = None if forced is None else forced.to(torch.int64).contiguous()  # kept sub-pixels, or NULL
        status = self._run(
            state,
            row.shape[0],
            uniforms.data_ptr(),
            temperature.data_ptr(),
            row.data_ptr(),
            log_prob.data_ptr(),
            None if forced is None else forced.data_ptr(),
        )
        if status != 0:
            raise MemoryError("the native row kernel could not allocate its scratch memory")


class NativeGatedDecoder(NativeDecoder):
    """GatedRowDecoder's loop; state: L horizontal buffers then L row biases."""

    def __init__(self, library: ctypes.CDLL, decoder: GatedRowDecoder, width: int, image_channels: int) -> None:
        super().__init__(library)
        head = decoder.head
        self.layers = len(decoder.h_weight)
        self._weights = GatedWeights(
            self.layers,
            decoder.n,
            image_channels,
            width,
            head.hidden_w.shape[1],
            self._ints(decoder.h_width),
            self._ints([w.shape[0] // kw for w, kw in zip(decoder.h_weight, decoder.h_width)]),
            self._matrices(decoder.h_weight),
            self._matrices(decoder.out_weight),
            self._tensors(decoder.out_bias),
            self._matrix(head.hidden_w),
            self._tensor(head.hidden_b),
            self._matrices(head.logits_w),
            self._tensors(head.logits_b),
        )

    def _run(self, state: list[torch.Tensor], batch: int, *outputs: int | None) -> int:
        return self._library.gated_decode_row(
            ctypes.byref(self._weights),
            batch,
            _pointers(state[: self.layers]),
            _pointers(state[self.layers :]),
            *outputs,
        )


class NativePixelCNNDecoder(NativeDecoder):
    """PixelCNNRowDecoder's loop; state: the input window, the input bias, then one window per block."""

    def __init__(self, library: ctypes.CDLL, decoder: PixelCNNRowDecoder, width: int, image_channels: int) -> None:
        super().__init__(library)
        head = decoder.head
        self._weights = PixelCNNWeights(
            len(decoder.conv_weight),
            decoder.in_weight.shape[1],
            image_channels,
            width,
            head.hidden_w.shape[1],
            decoder.in_half,
            self._ints(decoder.k_half),
            self._matrix(decoder.in_weight),
            self._matrices(decoder.conv_weight),
            self._tensors(decoder.conv_bias),
            self._matrices(decoder.reduce_weight),
            self._tensors(decoder.reduce_bias),
            self._matrices(decoder.expand_weight),
            self._tensors(decoder.expand_bias),
            self._matrix(head.hidden_w),
            self._tensor(head.hidden_b),
            self._matrices(head.logits_w),
            self._tensors(head.logits_b),
        )

    def _run(self, state: list[torch.Tensor], batch: int, *outputs: int | None) -> int:
        return self._library.pixelcnn_decode_row(
            ctypes.byref(self._weights), batch, state[0].data_ptr(), state[1].data_ptr(), _pointers(state[2:]), *outputs
        )


class NativeGatedVertical(NativeDecoder):
    """CachedGated's per-row work in C: `begin_row` (the vertical stack) and `end_row` (the push of the
    drawn row), called like CachedGated's methods, reading and writing the GatedCache's tensors. The kept
    vertical rows are held zero-padded, (B, W + kw - 1, in), not unfolded as the torch methods hold them
    (CachedGated.unfold_row turns one into the other): a fifth of the memory traffic (`empty_cache`).

    The torch methods stay the readable reference (float64, CUDA, no compiler, native=False). The C sums
    run in their written order (bias, then each kept row's product, then the class bias; the link's
    biases before its product), MKL's in its own, so the vertical stack's numbers differ from the torch
    ones by rounding (~1e-7 relative); the gate is the per-sub-pixel kernel's own (row_kernels.c `gate`).
    Each column of each image is computed on its own, so no batch padding is needed."""

    def __init__(self, library: ctypes.CDLL, impl: CachedGated) -> None:
        super().__init__(library)
        config = impl.config
        self.layers, self.n, self.width = len(impl.v_weight), impl.n, config.width
        self.channels = config.image_channels
        self.impl = impl
        self.v_width = list(impl.v_width)
        self.v_rows = [len(w) for w in impl.v_weight]
        self.kept_rows = [impl.kept_rows(index) for index in range(self.layers)]
        # Floats per image of each layer's h_buffers (W + kw - 1, in), whose unwritten part begin_row zeroes.
        h_size = [(self.width + kw - 1) * (self.channels if i == 0 else self.n) for i, kw in enumerate(impl.h_width)]
        self._weights = GatedVertical(
            self.layers,
            self.n,
            self.channels,
            self.width,
            self._ints(self.v_rows),
            self._ints(self.v_width),
            self._ints(h_size),
            self._matrices([w for layer in impl.v_weight for w in layer]),
            self._tensors(impl.v_bias),
            self._matrices(impl.link_weight),
            self._tensors(impl.link_bias),
        )

    @staticmethod
    def _check(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if not all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors):
            raise ValueError("the native vertical stack needs contiguous float32 caches")
        return tensors

    def empty_cache(self, labels: torch.Tensor | None, batch: int) -> GatedCache:
        """CachedGated.empty_cache in this layout: every kept vertical row zero (no row known yet)."""
        vertical = [
            [torch.zeros((batch, self.width + kw - 1, self.channels if index == 0 else self.n)) for _ in range(rows)]
            for index, (rows, kw) in enumerate(zip(self.kept_rows, self.v_width))
        ]
        return self.impl.empty_cache(labels, batch, torch.device("cpu"), torch.float32, vertical)

    def begin_row(self, state: DecodeCache) -> None:
        """CachedGated.begin_row: row_bias, the new kept rows of layers 1.., and zero in h_buffers where the row
        reads before it writes (row_kernels.c, zero_horizontal_inputs; the rest is left as it was)."""
        s = cast(GatedCache, state)
        b, w, n = s.batch, self.width, self.n
        rows = []
        for index in range(self.layers):
            kept = s.vertical[index]
            if index > 0:  # layer index - 1's output for this row, written (and its padding zeroed) by the kernel
                kept = kept + [torch.empty((b, w + self.v_width[index] - 1, n), dtype=torch.float32)]
                s.vertical[index] = kept[1:]
            rows += kept
        for index, bias in enumerate(s.row_bias):
            if bias is None or bias.shape[0] != b:  # scratch: reused from the last row when there is one
                s.row_bias[index] = torch.empty((b, w, 2 * n), dtype=torch.float32)
        status = self._library.gated_begin_row(
            ctypes.byref(self._weights),
            b,
            _pointers(self._check(rows)),
            _pointers(self._check(s.v_bias)),
            _pointers(self._check(s.h_bias)),
            _pointers(cast(list[torch.Tensor], s.row_bias)),  # all allocated just above
            _pointers(self._check(s.h_buffers)),
        )
        if status != 0:
            raise MemoryError("the native vertical stack could not allocate its scratch memory")

    def end_row(self, state: DecodeCache, row: torch.Tensor) -> None:
        """CachedGated.end_row: the drawn row (B, C, W) int64 joins layer 0's kept rows."""
        s = cast(GatedCache, state)
        row = row.to(torch.int64).contiguous()
        fresh = torch.empty((s.batch, self.width + self.v_width[0] - 1, self.channels), dtype=torch.float32)
        self._library.gated_end_row(ctypes.byref(self._weights), s.batch, row.data_ptr(), fresh.data_ptr())
        s.vertical[0] = s.vertical[0][1:] + [fresh]
