"""The caches of a batch of images being decoded: what prefill fills, each row step reads and writes, and
the scheduler selects (an image leaves) and concatenates (an image joins).

Like a KV cache in an LLM server. Caches start at exact zeros where the full model zero-pads, so row 0 and
column 0 see the same numbers as in a full forward pass (bias is added to the convolution of the zeros,
never to the padding itself). All cache tensors have the batch first and none depends on the row index, so
images at different rows share one decode step; that is what lets the scheduler batch requests
continuously.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch


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
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = [None] * len(value) if f.metadata.get("scratch") else _apply(value, lambda t: t[index])
        return type(self)(**picked)

    @staticmethod
    def concat(caches: list[DecodeCache]) -> DecodeCache:
        """The caches of all images of `caches` (of one type), in order; one cache is itself (not copied:
        its scratch fields are recomputed at the next row start anyway)."""
        if len(caches) == 1:
            return caches[0]
        cls = type(caches[0])
        merged: dict[str, Any] = {}
        for f in fields(cls):
            parts = [getattr(c, f.name) for c in caches]
            merged[f.name] = [None] * len(parts[0]) if f.metadata.get("scratch") else _merge(parts)
        return cls(**merged)


def _apply(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """fn on every tensor of a tensor or a (nested) list of them."""
    return [_apply(v, fn) for v in value] if isinstance(value, list) else fn(value)


def _merge(parts: list[Any]) -> Any:
    """torch.cat of corresponding tensors in equally shaped (nested) lists."""
    return [_merge(list(group)) for group in zip(*parts)] if isinstance(parts[0], list) else torch.cat(parts)


def scratch() -> Any:
    """A field recomputed at every row start (see DecodeCache)."""
    return field(metadata={"scratch": True})


@dataclass
class GatedCache(DecodeCache):
    # Per layer, the kept rows of its vertical input, oldest first, each unfolded: (B, W, kw * in) holds,
    # for column j, the kw columns j - kw//2 .. j + kw//2 of that row (zero-padded), channels innermost;
    # on the C row loop zero-padded instead, (B, W + kw - 1, in) (c_kernel.NativeGatedVertical).
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
