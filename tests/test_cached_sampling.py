"""Cached sampling is exact: same draws -> the same images as the naive reference sampler, every step's
logits equal the full forward pass, completion keeps the known rows, log_prob is the likelihood."""

from __future__ import annotations

import pytest
import torch

from app.engine import CachedSampler, iter_sample, sample_cached
from app.model import nll_nats, sample_naive
from tests.helpers import ARCH_CHANNELS, tiny_model

COMBOS = [(arch, c, k) for arch, c in ARCH_CHANNELS for k in (0, 3)]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("arch,channels,classes", COMBOS)
def test_cached_sampling_equals_naive_sampling(arch, channels, classes):
    model = tiny_model(arch, channels, size=6, num_classes=classes, seed=11)
    for temperature in (1.0, 0.7):
        naive = sample_naive(model, 3, temperature=temperature, seed=5)
        cached = sample_cached(model, 3, temperature=temperature, seed=5)
        assert torch.equal(naive.images, cached.images)
        assert (naive.labels is None) == (classes == 0)
        if classes:
            assert torch.equal(naive.labels, cached.labels)
        torch.testing.assert_close(naive.log_prob, cached.log_prob, rtol=0, atol=1e-9)
    # Not a constant: another seed gives other images.
    assert not torch.equal(cached.images, sample_cached(model, 3, seed=6).images)


@pytest.mark.parametrize("arch,channels,classes", COMBOS)
def test_completion_is_prefill_then_decode_and_equals_naive(arch, channels, classes):
    model = tiny_model(arch, channels, size=6, num_classes=classes, seed=12)
    known = torch.randint(0, 256, (2, channels, 6, 6), generator=seeded(1), dtype=torch.uint8)
    labels = torch.tensor([1, 2]) if classes else None
    for rows in (1, 3, 5):
        naive = sample_naive(model, 2, labels=labels, seed=rows, known=known, known_rows=rows)
        cached = sample_cached(model, 2, labels=labels, seed=rows, known=known, known_rows=rows)
        assert torch.equal(cached.images[:, :, :rows], known[:, :, :rows]), "known rows must come back unchanged"
        assert torch.equal(naive.images, cached.images)
        torch.testing.assert_close(naive.log_prob, cached.log_prob, rtol=0, atol=1e-9)


@pytest.mark.parametrize("arch,channels,classes", COMBOS)
def test_every_step_logits_equal_the_full_forward_in_float32(arch, channels, classes):
    """Teacher-forced through the compiled decoder's own step and write: prefill two known rows, then
    every sub-pixel's logits must match the full forward pass over the finished image."""
    model = tiny_model(arch, channels, size=7, num_classes=classes, seed=13, dtype=torch.float32)
    sampler = CachedSampler(model)
    known = torch.randint(0, 256, (2, channels, 7, 7), generator=seeded(3), dtype=torch.uint8)
    result = sample_cached(model, 2, seed=4, known=known, known_rows=2, sampler=sampler)
    images = result.images.long()
    steps = 0
    with torch.no_grad():
        full = model(images, result.labels)  # (B, 256, C, H, W)
        state = sampler.prefill(images, result.labels, 2)
        for i in range(2, 7):
            sampler.row_loop.begin_row(state)  # the kernel's vertical stack where it runs, on its own caches
            for j in range(7):
                for c in range(channels):
                    got = sampler.step(state, j, c)
                    torch.testing.assert_close(got, full[:, :, c, i, j], rtol=0, atol=1e-4, msg=f"pixel {i},{j},{c}")
                    sampler.write(state, j, c, images[:, c, i, j])
                    steps += 1
            sampler.row_loop.end_row(state, images[:, :, i])
    assert steps == 5 * 7 * channels


@pytest.mark.parametrize("arch,channels", ARCH_CHANNELS)
def test_the_compiled_decoder_equals_the_same_module_run_eagerly(arch, channels):
    model = tiny_model(arch, channels, size=6, num_classes=3, seed=16)
    compiled, eager = CachedSampler(model), CachedSampler(model, compiled=False)
    assert isinstance(compiled.decoder, torch.jit.ScriptModule)
    assert not isinstance(eager.decoder, torch.jit.ScriptModule)
    a = sample_cached(model, 3, seed=2, sampler=compiled)
    b = sample_cached(model, 3, seed=2, sampler=eager)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.log_prob, b.log_prob)


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
def test_rows_stream_in_order_and_log_prob_is_the_likelihood(arch):
    model = tiny_model(arch, 1, size=6, num_classes=3, seed=14)
    events = list(iter_sample(model, 2, seed=8, known=torch.zeros(1, 1, 6, 6, dtype=torch.uint8), known_rows=2))
    *rows, result = events
    assert [i for i, _ in rows] == [2, 3, 4, 5]
    for i, row in rows:
        assert torch.equal(row, result.images[:, :, i])
    full = sample_cached(model, 2, seed=9)
    with torch.no_grad():
        nll = nll_nats(model, full.images, full.labels).double()
    torch.testing.assert_close(full.log_prob, -nll, rtol=0, atol=1e-8)


def test_bad_arguments_are_rejected_with_a_clear_message():
    model = tiny_model("gated", 1, size=6, num_classes=3)
    for temperature in (0, 0.049, 20.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"temperature must be between 0.05 and 20.0"):
            sample_cached(model, 1, temperature=temperature)
    with pytest.raises(ValueError, match=r"labels must be in 0..2"):
        sample_cached(model, 1, labels=torch.tensor([3]))
    with pytest.raises(ValueError, match="known_rows must be in 0..6"):
        sample_cached(model, 1, known=torch.zeros(1, 1, 6, 6, dtype=torch.uint8), known_rows=7)
    unconditional = tiny_model("gated", 1, size=6)
    with pytest.raises(ValueError, match="unconditional"):
        sample_cached(unconditional, 1, labels=torch.tensor([0]))


@pytest.mark.parametrize("channels,classes", [(1, 0), (3, 3)])
def test_static_bucket_rows_equal_the_dynamic_path(channels, classes):
    """The static-buffer path that CUDA graphs replay (run eagerly here) gives the same images, for a
    batch that does not fill its bucket and for completion."""
    model = tiny_model("gated", channels, size=6, num_classes=classes, seed=15)
    static = CachedSampler(model, static_rows=True)
    assert static.row_loop.name == "static-torchscript" and not static.row_loop.capture
    for n, rows in ((3, 0), (5, 2), (1, 0)):
        known = torch.randint(0, 256, (n, channels, 6, 6), generator=seeded(n), dtype=torch.uint8) if rows else None
        a = sample_cached(model, n, seed=n, known=known, known_rows=rows, sampler=static)
        b = sample_naive(model, n, seed=n, known=known, known_rows=rows)
        assert torch.equal(a.images, b.images)
        torch.testing.assert_close(a.log_prob, b.log_prob, rtol=0, atol=1e-9)
    assert set(static.row_loop.buffers) == {4, 8, 2}  # batches run padded to an even size (see padded_batch)


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
def test_cached_equals_naive_in_float32_on_a_small_model(arch):
    """The served dtype: same pictures from the same seeds (float32 rounding differs between the cached
    matrix products and the naive convolutions by ~1e-6 here, far from these draws' CDF boundaries), and
    the agreement replay (pixelcnn bench agreement) says so too."""
    from app.bench.agreement import naive_agreement

    model = tiny_model(arch, 1, size=8, num_classes=3, seed=60, dtype=torch.float32)
    for seed in range(4):
        cached = sample_cached(model, 4, seed=seed)
        naive = sample_naive(model, 4, seed=seed)
        assert torch.equal(cached.images, naive.images) and torch.equal(cached.labels, naive.labels)
        torch.testing.assert_close(cached.log_prob, naive.log_prob, rtol=0, atol=1e-3)
        assert naive_agreement(model, 4, seed)["identical"] == 4


def test_the_agreement_replay_finds_the_first_sub_pixel_that_differs(monkeypatch):
    import app.bench.agreement as agreement

    model = tiny_model("gated", 1, size=6, seed=61, dtype=torch.float32)
    real = agreement.sample_cached

    def one_pixel_off(*args, **kwargs):
        result = real(*args, **kwargs)
        result.images[1, 0, 2, 3] ^= 1  # image 1, row 2, column 3: raster index 2 * 6 + 3
        return result

    monkeypatch.setattr(agreement, "sample_cached", one_pixel_off)
    report = agreement.naive_agreement(model, 3, seed=5)
    assert report["first_difference"] == [None, 15, None] and report["identical"] == 2
