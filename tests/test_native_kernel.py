"""The C row kernel (app/engine/native.py): it is what float32 CPU sampling runs, it follows the same
protocol as the readable TorchScript decoder it replaces, and the server falls back to that decoder when
no kernel can be built. Its batch invariance is tested with the engine's (tests/test_batch_invariance.py),
its agreement with the independent naive sampler in tests/test_cached_sampling.py."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from app.engine import CachedSampler, native, sample_cached
from tests.helpers import tiny_model

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")


@needs_compiler
@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
def test_float32_cpu_sampling_runs_the_native_kernel(arch):
    model = tiny_model(arch, dtype=torch.float32)
    assert CachedSampler(model).native is not None
    assert CachedSampler(tiny_model(arch)).native is None, "float64 models run the torch decoder"
    assert CachedSampler(model, compiled=False).native is None


@needs_compiler
@pytest.mark.parametrize("arch,channels,classes", [("gated", 1, 0), ("gated", 3, 4), ("pixelcnn", 1, 3),
                                                   ("pixelcnn", 3, 0)])
def test_native_kernel_draws_what_the_torchscript_decoder_draws(arch, channels, classes):
    model = tiny_model(arch, image_channels=channels, num_classes=classes, dtype=torch.float32, hidden_channels=18)
    fast = CachedSampler(model)
    reference = CachedSampler(model, native=False)  # the TorchScript decoder
    for seed, temperature in [(0, 1.0), (1, 0.7), (2, 3.0)]:
        a = sample_cached(model, 5, seed=seed, sampler=fast, temperature=temperature)
        b = sample_cached(model, 5, seed=seed, sampler=reference,
                          temperature=temperature)
        # Rounding differs (~1e-6 in the logits), so a uniform that close to a CDF boundary could part them:
        # with 5 x 64 x C draws per image set that is far rarer than one in a million runs.
        assert torch.equal(a.images, b.images), f"seed {seed}: {(a.images != b.images).sum()} sub-pixels differ"
        torch.testing.assert_close(a.log_prob, b.log_prob, rtol=1e-5, atol=1e-3)


def test_without_the_kernel_sampling_falls_back_to_torchscript(monkeypatch, tmp_path, caplog):
    model = tiny_model("gated", dtype=torch.float32)
    expected = sample_cached(model, 2, seed=3,
                             sampler=CachedSampler(model, compiled=False))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("PIXELCNN_KERNEL_CACHE", str(tmp_path))  # nothing built before can be found
    monkeypatch.setattr(native, "_compiler", lambda: shutil.which("false"))  # a compiler that always fails
    with caplog.at_level(logging.WARNING, logger="app.engine.native"):
        sampler = CachedSampler(model)
    assert sampler.native is None
    assert "TorchScript" in caplog.text
    result = sample_cached(model, 2, seed=3, sampler=sampler)
    assert torch.equal(result.images, expected.images)

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)  # no compiler at all
    assert native.load_kernel() is None

    monkeypatch.undo()
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("PIXELCNN_NATIVE_KERNEL", "0")  # switched off by the operator
    assert native.load_kernel() is None


@needs_compiler
def test_the_kernel_is_built_once_into_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("PIXELCNN_KERNEL_CACHE", str(tmp_path))
    assert native.load_kernel() is not None
    built = list(tmp_path.glob("row_kernels-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".*")), "one library, no half-written file left"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load_kernel() is not None
    assert built[0].stat().st_mtime_ns == stamp, "a second start reuses the library"


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
@pytest.mark.parametrize("compiled", [True, False])
def test_a_level_of_probability_zero_is_never_drawn(arch, compiled):
    """With u = 0 the protocol takes the first level whose CDF exceeds 0: never one whose probability
    underflowed to exactly 0 (here level 0, its logit 1e4 below the rest)."""
    model = tiny_model(arch, dtype=torch.float32)
    with torch.no_grad():
        model.head.logits.bias[0] -= 1e4  # output channel = level * C + colour: level 0 of the only colour
    sampler = CachedSampler(model, compiled=compiled)
    c, h, w = model.config.shape
    state = sampler.prefill(torch.zeros((3, c, h, w), dtype=torch.long), None, 0)
    row, log_prob = sampler.decode_row(state, torch.zeros((3, c, w), dtype=torch.float64),
                                       torch.ones((3, 1), dtype=torch.float64))
    assert (row > 0).all(), row
    assert torch.isfinite(log_prob).all()
