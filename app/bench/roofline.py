"""The arithmetic side of the sampling benchmark: multiply-adds per image of each path, and the machine's
measured single-core FP32 peak, so that a time can be read as a fraction of the physical limit.

Multiply-adds are counted from the matrices the paths multiply by (which the config fixes): the cached
sampler's per-column vertical stack and per-sub-pixel horizontal stack and head (row_kernels.c), and the
forward pass's convolutions at every position (masked weights count: the convolution multiplies them).

The peak comes from native/peak.c, built like the row kernel (-O3 -march=native): `fma_gflops`, fused
multiply-adds on every vector unit, which is how the row kernel computes its products (row_kernels.c
`fused`): the physical limit of both.
"""

from __future__ import annotations

import ctypes
import time

from torch import nn

from app.engine import CachedSampler, c_library
from app.engine.cached_models import CachedGated

PEAK_SOURCE = c_library.SOURCE.with_name("peak.c")


def cached_macs(sampler: CachedSampler) -> int:
    """Multiply-adds per image of cached sampling (what the row kernel computes)."""
    config = sampler.config
    pixels, decoder = config.height * config.width, sampler.impl.decoder
    head = decoder.head.hidden_w.numel() + decoder.head.logits_w[0].numel()  # one colour's logits
    if isinstance(sampler.impl, CachedGated):
        impl = sampler.impl
        vertical = sum(w.numel() for layer in impl.v_weight for w in layer) + sum(w.numel() for w in impl.link_weight)
        horizontal = sum(w.numel() for w in decoder.h_weight) + sum(w.numel() for w in decoder.out_weight)
        return pixels * vertical + pixels * config.image_channels * (horizontal + head)
    per_sub_pixel = decoder.in_weight.numel() + sum(
        w.numel() for ws in (decoder.conv_weight, decoder.reduce_weight, decoder.expand_weight) for w in ws
    )
    return pixels * config.image_channels * (per_sub_pixel + head)


def forward_macs(model: nn.Module) -> int:
    """Multiply-adds per image of one forward pass: every convolution (all stride 1, same size) at every
    position."""
    config = model.config
    per_position = sum(m.weight.numel() // m.groups for m in model.modules() if isinstance(m, nn.Conv2d))
    return per_position * config.height * config.width


def _peak_library() -> ctypes.CDLL | None:
    compiler = c_library._compiler()
    if compiler is None:
        return None
    library = ctypes.CDLL(str(c_library.build(compiler, PEAK_SOURCE)))
    library.peak_fma.restype, library.peak_fma.argtypes = ctypes.c_float, [ctypes.c_int64, ctypes.c_float]
    return library


def measured_peak(seconds: float = 0.2, repeats: int = 5) -> dict | None:
    """This core's FP32 peak in GFLOP/s with FMAs (best of `repeats` runs of about `seconds` each); None
    without a C compiler."""
    library = _peak_library()
    if library is None:
        return None
    floats = library.peak_vector_floats() * library.peak_accumulators()
    iterations = 1_000_000
    while (elapsed := _timed(library.peak_fma, iterations)) < seconds / 4:  # calibrate
        iterations *= 4
    iterations = int(iterations * seconds / elapsed)
    best = min(_timed(library.peak_fma, iterations) for _ in range(repeats))
    return {"vector_floats": library.peak_vector_floats(), "fma_gflops": round(2 * floats * iterations / best / 1e9, 1)}


def _timed(function, iterations: int) -> float:
    started = time.perf_counter()
    function(iterations, 1.0)
    return time.perf_counter() - started


def gflops(macs_per_image: int, images: int, seconds: float) -> float:
    return round(2 * macs_per_image * images / seconds / 1e9, 1)
