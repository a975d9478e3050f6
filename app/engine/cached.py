"""Exact sampling with cached activations: `prefill` runs one batched pass over the known rows of an image,
then `decode_row` generates one row at a time, and each step only computes the activations at the new
pixel (like a KV cache in an LLM server).

Where things are: the caches (cache.py), the per-architecture cached models that fill and advance them
(cached_models.py), the row loops that draw a row's sub-pixels and the padding each needs (row_loops.py,
which also says which runs where), the per-sub-pixel code (row_decoders.py in torch, c_kernel.py in C),
and the sampling protocol that fixes the random numbers (protocol.py). CachedSampler ties them together
for one model; the scheduler batches many requests through one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import torch

from app.model import ModelConfig, PixelCNNModel, Samples
from app.model.checkpoint import full_float32_on_cuda
from app.model.gated import GatedPixelCNN

from .cache import DecodeCache
from .cached_models import CachedGated, CachedPixelCNN
from .posterior import infer_labels
from .protocol import forced_row, row_uniforms, start_sampling
from .row_loops import Target, choose_row_loop, exact_execution, script
from .wavefront import Wavefront, uniforms_ahead


class CachedSampler:
    """Prefill + row-by-row decode for any model of this package.

    Batch invariance: an image's numbers never depend on which other images share its decode steps. The
    row loop that runs (`row_loop`, chosen by row_loops.choose_row_loop) says at which batch sizes that
    holds bit for bit, and every step is padded (with copies of its first image) to such a size.
    tests/test_batch_invariance.py checks this against crowds of other requests.

    `compiled`: run the row loop compiled (the default: faster, and GIL-free, which is what lets the
    engine's decode lanes run in parallel) or as the plain module it also is. Compiled means, for a
    float32 model on the CPU, the C kernel when it builds, else TorchScript. `native=False` keeps the
    TorchScript decoder even where the kernel builds (the reference it is compared with).
    `static_rows`: run each row's per-pixel loop on static buffers of fixed batch buckets (gated models
    only): CUDA graphs on CUDA, where it is the default (see row_loops.StaticRows).
    """

    def __init__(
        self, model: PixelCNNModel, static_rows: bool | None = None, compiled: bool = True, native: bool = True
    ) -> None:
        self.config: ModelConfig = model.config
        parameter = next(model.parameters())
        self.device = parameter.device
        with torch.no_grad():
            self.impl = CachedGated(model) if isinstance(model, GatedPixelCNN) else CachedPixelCNN(model)
        # The torch row decoder: the reference row loop, and `step`/`write` for tests and tools.
        self.decoder = script(self.impl.decoder) if compiled else self.impl.decoder
        if self.device.type == "cuda":
            full_float32_on_cuda()
        target = Target(self.impl, self.decoder, self.device, parameter.dtype, compiled, native)
        self.row_loop = choose_row_loop(target, static_rows)

    def capture_graphs(self) -> None:
        """Record the CUDA graph of every static bucket now (the engine does this before it serves)."""
        self.row_loop.prepare()

    def padded_batch(self, batch: int) -> int:
        """The batch size a step of `batch` images runs at: the row loop's padding rule."""
        q = self.row_loop.batch_quantum
        return max(self.row_loop.min_batch, -(-batch // q) * q)

    @torch.no_grad()
    def prefill(self, canvas: torch.Tensor, labels: torch.Tensor | None, known_rows: int) -> DecodeCache:
        """Caches for decoding row `known_rows` onwards, by the row loop (RowLoop.prefill): the same numbers
        for an image whatever its batch."""
        canvas = canvas.to(self.device)
        labels = None if labels is None else labels.to(self.device)
        return self.row_loop.prefill(canvas, labels, known_rows)

    @property
    def numerics(self) -> str:
        """The row loop's numerics fingerprint (RowLoop.numerics)."""
        return self.row_loop.numerics

    @torch.no_grad()
    def decode_row(
        self,
        state: DecodeCache,
        uniforms: torch.Tensor,
        temperature: torch.Tensor,
        forced: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one row for every image in the batch; `state` moves on to the next row.

        uniforms (B, C, W) float64, temperature (B, 1) -> values int64 (B, C, W), log p of the row (B,).
        forced int64 (B, C, W), if given: values >= 0 are kept sub-pixels, taken instead of drawn and not
        counted in log p (protocol.forced_row)."""
        b = state.batch
        padded = self.padded_batch(b)
        work = state
        if padded != b:  # extra images: copies of the first, drawn with harmless uniforms, then dropped
            work = state.select(torch.cat([torch.arange(b), torch.zeros(padded - b, dtype=torch.long)]).to(self.device))
            uniforms = torch.cat([uniforms, uniforms.new_full((padded - b, *uniforms.shape[1:]), 0.5)])
            temperature = torch.cat([temperature, temperature.new_ones((padded - b, 1))])
            if forced is not None:
                forced = torch.cat([forced, forced.new_full((padded - b, *forced.shape[1:]), -1)])
        row, log_prob = self._decode_row(work, uniforms, temperature, forced)
        if padded != b:
            kept = work.select(torch.arange(b, device=self.device))
            for f in fields(state):
                setattr(state, f.name, getattr(kept, f.name))
        return row[:b], log_prob[:b]

    def _decode_row(
        self, state: DecodeCache, uniforms: torch.Tensor, temperature: torch.Tensor, forced: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.row_loop.begin_row(state)
        row, log_prob = self.row_loop.draw_row(state, uniforms, temperature, forced)
        self.row_loop.end_row(state, row)
        return row, log_prob

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


def iter_sample(
    model: PixelCNNModel,
    n: int = 1,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    known: torch.Tensor | None = None,
    known_rows: int = 0,
    sampler: CachedSampler | None = None,
    label_mode: str = "posterior",
    known_columns: int = 0,
    rows_in_one_call: bool = False,
) -> Iterator[tuple[int, torch.Tensor] | Samples]:
    """Yield (row index, uint8 row (n, C, W)) as each row is final, then the Samples. Kept pixels:
    rows < known_rows of `known`, and the first `known_columns` pixels of row known_rows.

    `rows_in_one_call`: where the row loop is the C kernel, draw the rows (after a first one with kept
    pixels) in one call of it, on this thread (Wavefront.decode), instead of one call per row: the same
    numbers without a trip through Python per row, the rows all yielded at the end.

    Same protocol (and so the same images) as app.model.sample_naive."""
    config = model.config
    sampler = sampler or CachedSampler(model)
    streams, labels, canvas, infer = start_sampling(
        config, n, labels, temperature, seed, known, known_rows, sampler.device, label_mode, known_columns
    )
    class_log_probs = None
    if infer:
        labels, class_log_probs = infer_labels(model, streams, canvas, known_rows, known_columns)
    state = sampler.prefill(canvas, labels, known_rows)
    temperatures = torch.full((n, 1), float(temperature), dtype=torch.float64)
    log_prob = torch.zeros(n, dtype=torch.float64, device=sampler.device)
    in_one_call = Wavefront.for_row_loop(sampler.row_loop) if rows_in_one_call else None
    for i in range(known_rows, config.height):
        forced = forced_row(canvas, i, known_columns) if i == known_rows else None
        if in_one_call is not None and forced is None:
            uniforms = uniforms_ahead(streams, config.height - i, config.image_channels, config.width)
            rows, row_log_probs = in_one_call.decode(state, uniforms, temperatures, lanes=1)
            canvas[:, :, i:] = rows.permute(1, 2, 0, 3)  # (R, n, C, W) -> (n, C, R, W)
            for lp in row_log_probs:  # row by row, as the one-row sums run
                log_prob += lp
            yield from enumerate(rows.to(torch.uint8), start=i)
            break
        uniforms = row_uniforms(streams, config.image_channels, config.width)
        row, lp = sampler.decode_row(state, uniforms, temperatures, forced)
        canvas[:, :, i] = row
        log_prob += lp
        yield i, row.to(torch.uint8).cpu()
    yield Samples(canvas.to(torch.uint8).cpu(), labels, log_prob.cpu(), class_log_probs)


def sample_cached(model: PixelCNNModel, n: int = 1, **kwargs: Any) -> Samples:
    """Cached sampling to completion; keyword arguments as iter_sample, whose rows_in_one_call it sets (no
    row is wanted before the end)."""
    *_, result = iter_sample(model, n, rows_in_one_call=True, **kwargs)
    assert isinstance(result, Samples)  # iter_sample ends with it
    return result
