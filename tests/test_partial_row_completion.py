"""Completion from kept pixels that end mid-row: the first generated row's kept sub-pixels are teacher-forced
(taken, not drawn, not counted in log_prob) while the row's uniforms are still drawn whole, so the numbers
of every later pixel follow the protocol. Every decode backend against the independent naive sampler."""

from __future__ import annotations

import pytest
import torch

from app.engine import CachedSampler, Engine, GenerationRequest, sample_cached
from app.model import sample_naive
from app.model.likelihood import nll_per_subpixel
from tests.helpers import ARCH_CHANNELS, assert_idle, run, started, tiny_model

SIZE = 6
KEPT = (1, 8, 15, 29)  # pixels kept in raster order: mid-row 0, 1, 2 and 4


def known_images(n: int, channels: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, SIZE, SIZE), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def kept_mask(kept: int) -> torch.Tensor:
    return (torch.arange(SIZE * SIZE) < kept).reshape(SIZE, SIZE)


def partial(kept: int) -> dict:
    return {"known_rows": kept // SIZE, "known_columns": kept % SIZE}


@pytest.mark.parametrize("classes", [0, 3])
@pytest.mark.parametrize("arch,channels", ARCH_CHANNELS)
def test_partial_row_completion_equals_naive_in_float64(arch, channels, classes):
    model = tiny_model(arch, channels, size=SIZE, num_classes=classes, seed=21)
    known = known_images(2, channels, seed=channels + classes)
    for kept in KEPT:
        naive = sample_naive(model, 2, seed=kept, known=known, known_pixels=kept)
        cached = sample_cached(model, 2, seed=kept, known=known, **partial(kept))
        mask = kept_mask(kept)
        assert torch.equal(cached.images[:, :, mask], known[:, :, mask]), "kept pixels must come back unchanged"
        assert torch.equal(naive.images, cached.images), kept
        torch.testing.assert_close(naive.log_prob, cached.log_prob, rtol=0, atol=1e-9)
        if classes:  # drawn from p(class | kept pixels), mid-row pixels included
            assert torch.equal(naive.labels, cached.labels)
            torch.testing.assert_close(naive.class_log_probs, cached.class_log_probs, rtol=0, atol=1e-9)


BACKENDS = [
    (arch, channels, backend)
    for arch, channels in ARCH_CHANNELS
    for backend in ("c-kernel", "torchscript", "static-torchscript")
    if backend != "static-torchscript" or arch == "gated"  # static rows are for the gated model only
]


@pytest.mark.parametrize("arch,channels,backend", BACKENDS)
def test_partial_row_completion_equals_naive_in_float32_on_every_backend(arch, channels, backend):
    model = tiny_model(arch, channels, size=SIZE, num_classes=3, seed=22, dtype=torch.float32, hidden_channels=18)
    options = {
        "c-kernel": {},
        "torchscript": {"native": False},
        "static-torchscript": {"static_rows": True, "native": False},
    }
    sampler = CachedSampler(model, **options[backend])
    assert sampler.row_loop.name == backend
    known = known_images(3, channels, seed=5)
    labels = torch.tensor([0, 2, 1])
    for kept in KEPT:
        cached = sample_cached(model, 3, labels=labels, seed=kept, known=known, sampler=sampler, **partial(kept))
        naive = sample_naive(model, 3, labels=labels, seed=kept, known=known, known_pixels=kept)
        mask = kept_mask(kept)
        assert torch.equal(cached.images[:, :, mask], known[:, :, mask])
        assert torch.equal(cached.images, naive.images), f"{kept}: {(cached.images != naive.images).sum()} differ"
        torch.testing.assert_close(cached.log_prob, naive.log_prob, rtol=0, atol=1e-3)


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
def test_log_prob_counts_only_the_generated_sub_pixels(arch):
    model = tiny_model(arch, 3, size=SIZE, seed=23)
    kept = 15
    result = sample_cached(model, 2, seed=3, known=known_images(1, 3, seed=1), **partial(kept))
    with torch.no_grad():
        per_subpixel = nll_per_subpixel(model(result.images.long(), None), result.images.long()).double()
    generated = ~kept_mask(kept)
    torch.testing.assert_close(result.log_prob, -per_subpixel[:, :, generated].sum(dim=(1, 2)), rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", [{}, {"native": False}])
def test_nothing_forced_changes_nothing(backend):
    """A row whose forced values are all -1 (nothing kept) draws exactly what a row without them draws, so
    rows-only requests keep their bytes."""
    model = tiny_model("gated", 1, size=SIZE, num_classes=3, seed=24, dtype=torch.float32)
    sampler = CachedSampler(model, **backend)
    canvas = torch.zeros((3, 1, SIZE, SIZE), dtype=torch.long)
    labels = torch.tensor([0, 1, 2])
    uniforms = torch.rand((3, 1, SIZE), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    temperature = torch.ones((3, 1), dtype=torch.float64)
    plain = sampler.decode_row(sampler.prefill(canvas, labels, 0), uniforms, temperature)
    nothing = sampler.decode_row(
        sampler.prefill(canvas, labels, 0), uniforms, temperature, torch.full((3, 1, SIZE), -1)
    )
    assert torch.equal(plain[0], nothing[0]) and torch.equal(plain[1], nothing[1])


def test_bad_known_columns_are_rejected():
    model = tiny_model("gated", 1, size=SIZE)
    known = known_images(1, 1, seed=0)
    with pytest.raises(ValueError, match="known_columns must be in 0..5"):
        sample_cached(model, 1, known=known, known_rows=2, known_columns=6)
    with pytest.raises(ValueError, match="need a known image"):
        sample_cached(model, 1, known_columns=2)


def test_the_engine_batches_partial_row_completions_with_other_requests():
    """Two lanes, three requests decoded together: a sample, and completions whose kept pixels end in
    different columns of different rows (one split across the lanes). Each gets what it gets alone."""
    model = tiny_model("gated", 1, size=SIZE, num_classes=3, seed=25, dtype=torch.float32)
    known = known_images(1, 1, seed=9)
    requests = [
        GenerationRequest(n=2, seed=1),
        GenerationRequest(n=3, seed=2, known=known, **partial(15)),
        GenerationRequest(n=1, seed=3, labels=[1], known=known, **partial(4)),
    ]

    async def scenario():
        async with started(Engine(model, lanes=2, batch_wait_s=0.05)) as engine:
            streams = [engine.submit(request, rows=False) for request in requests]
            results = [await stream.result() for stream in streams]
            assert_idle(engine)
            return results

    for request, result in zip(requests, run(scenario())):
        kept = request.known_rows * SIZE + request.known_columns
        alone = sample_naive(model, request.n, labels=request.labels, seed=request.seed, known=known, known_pixels=kept)
        assert torch.equal(torch.as_tensor(result.images), alone.images)
        torch.testing.assert_close(torch.as_tensor(result.log_prob), alone.log_prob, rtol=0, atol=1e-3)
