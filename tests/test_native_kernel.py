"""The C row kernel (app/engine/c_kernel.py): it is what float32 CPU sampling runs, it follows the same
protocol as the readable TorchScript decoder it replaces, and the server falls back to that decoder when
no kernel can be built. Its batch invariance is tested with the engine's (tests/test_batch_invariance.py),
its agreement with the independent naive sampler in tests/test_cached_sampling.py."""

from __future__ import annotations

import logging
import shutil
from functools import partial

import pytest
import torch

from app.engine import CachedSampler, c_kernel, c_library, sample_cached
from tests.helpers import tiny_model, torch_layout

needs_compiler = pytest.mark.skipif(c_library._compiler() is None, reason="no C compiler on this machine")


@needs_compiler
@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
def test_float32_cpu_sampling_runs_the_native_kernel(arch):
    model = tiny_model(arch, dtype=torch.float32)
    assert CachedSampler(model).row_loop.name == "c-kernel"
    assert CachedSampler(tiny_model(arch)).row_loop.name == "torchscript", "float64 models run the torch decoder"
    assert CachedSampler(model, compiled=False).row_loop.name == "eager"


@needs_compiler
@pytest.mark.parametrize(
    "arch,channels,classes", [("gated", 1, 0), ("gated", 3, 4), ("pixelcnn", 1, 3), ("pixelcnn", 3, 0)]
)
def test_native_kernel_draws_what_the_torchscript_decoder_draws(arch, channels, classes):
    model = tiny_model(arch, image_channels=channels, num_classes=classes, dtype=torch.float32, hidden_channels=18)
    fast = CachedSampler(model)
    reference = CachedSampler(model, native=False)  # the TorchScript decoder
    for seed, temperature in [(0, 1.0), (1, 0.7), (2, 3.0)]:
        a = sample_cached(model, 5, seed=seed, sampler=fast, temperature=temperature)
        b = sample_cached(model, 5, seed=seed, sampler=reference, temperature=temperature)
        # Rounding differs (~1e-6 in the logits), so a uniform that close to a CDF boundary could part them:
        # with 5 x 64 x C draws per image set that is far rarer than one in a million runs.
        assert torch.equal(a.images, b.images), f"seed {seed}: {(a.images != b.images).sum()} sub-pixels differ"
        torch.testing.assert_close(a.log_prob, b.log_prob, rtol=1e-5, atol=1e-3)


def test_without_the_kernel_sampling_falls_back_to_torchscript(monkeypatch, tmp_path, caplog):
    model = tiny_model("gated", dtype=torch.float32)
    expected = sample_cached(model, 2, seed=3, sampler=CachedSampler(model, compiled=False))
    monkeypatch.setattr(c_library, "_loaded", {})
    monkeypatch.setenv("PIXELCNN_KERNEL_CACHE", str(tmp_path))  # nothing built before can be found
    monkeypatch.setattr(c_library, "_compiler", lambda: shutil.which("false"))  # a compiler that always fails
    with caplog.at_level(logging.WARNING, logger="app.engine.c_library"):
        sampler = CachedSampler(model)
    assert sampler.row_loop.name == "torchscript"
    assert "TorchScript" in caplog.text
    result = sample_cached(model, 2, seed=3, sampler=sampler)
    assert torch.equal(result.images, expected.images)

    monkeypatch.setattr(c_library, "_loaded", {})
    monkeypatch.setattr(c_library, "_compiler", lambda: None)  # no compiler at all
    assert c_library.load_kernel() is None

    monkeypatch.undo()
    monkeypatch.setattr(c_library, "_loaded", {})
    monkeypatch.setenv("PIXELCNN_NATIVE_KERNEL", "0")  # switched off by the operator
    assert c_library.load_kernel() is None


@pytest.mark.slow
@needs_compiler
def test_the_kernel_is_built_once_into_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(c_library, "_loaded", {})
    monkeypatch.setenv("PIXELCNN_KERNEL_CACHE", str(tmp_path))
    assert c_library.load_kernel() is not None
    built = list(tmp_path.glob("row_kernels-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".*")), "one library, no half-written file left"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(c_library, "_loaded", {})
    assert c_library.load_kernel() is not None
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
    row, log_prob = sampler.decode_row(
        state, torch.zeros((3, c, w), dtype=torch.float64), torch.ones((3, 1), dtype=torch.float64)
    )
    assert (row > 0).all(), row
    assert torch.isfinite(log_prob).all()


def nan_filled(empty, *args, **kwargs):
    """torch.empty, filled with NaN (a fresh allocation may well hold zeros, hiding a value never written)."""
    return empty(*args, **kwargs).fill_(float("nan"))


def _vertical_shapes():
    """The shipped model's vertical shapes (hidden 48, kernel rows 3 x 5, first layer 7 wide) on a
    smaller image, and a conditional RGB model (hidden a multiple of 6)."""
    return [
        dict(image_channels=1, num_classes=0, hidden_channels=48, layers=7, first_kernel_size=7, size=12),
        dict(image_channels=3, num_classes=3, hidden_channels=18, layers=3, first_kernel_size=5, size=8),
    ]


@needs_compiler
@pytest.mark.parametrize("shape", _vertical_shapes(), ids=["shipped-like", "rgb-conditional"])
@pytest.mark.parametrize("batch", [1, 5, 11])
def test_native_vertical_stack_matches_the_torch_begin_row(shape, batch, monkeypatch):
    """The C begin_row / end_row compute what the torch reference does, up to float32 rounding (their sums
    run in another order than MKL's), on caches with known rows and random labels."""
    import copy

    model = tiny_model("gated", dtype=torch.float32, **shape)
    sampler = CachedSampler(model)
    assert sampler.row_loop.vertical is not None and sampler.row_loop.batch_quantum == 1
    c, h, w = model.config.shape
    generator = torch.Generator().manual_seed(batch)
    canvas = torch.randint(0, 256, (batch, c, h, w), generator=generator)
    labels = torch.randint(0, shape["num_classes"], (batch,), generator=generator) if shape["num_classes"] else None
    state = sampler.prefill(canvas, labels, 4)
    for i in range(4, 7):  # a few rows, so that rows the kernel wrote are read again
        reference, fast = copy.deepcopy(torch_layout(sampler, state)), copy.deepcopy(state)
        for t in fast.h_buffers:
            t.fill_(float("nan"))  # left from the row before: the kernel zeroes what a row reads unwritten
        sampler.impl.begin_row(reference)
        with monkeypatch.context() as patched:  # what begin_row allocates starts as NaN: it must write all of it
            patched.setattr(c_kernel.torch, "empty", partial(nan_filled, torch.empty))
            sampler.row_loop.vertical.begin_row(fast)
        for layer in range(len(model.layers)):
            torch.testing.assert_close(fast.row_bias[layer], reference.row_bias[layer], rtol=1e-5, atol=1e-5)
            assert len(fast.vertical[layer]) == len(reference.vertical[layer])
            for a, b in zip(torch_layout(sampler, fast).vertical[layer], reference.vertical[layer]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # Layer 0 reads the current pixel's place before it is drawn: all zero. A later layer writes its
        # column j + kw - 1 before reading it: only its left padding must be zero.
        assert not fast.h_buffers[0].any()
        for layer, (kernel, buffer) in enumerate(zip(sampler.impl.decoder.h_width, fast.h_buffers)):
            assert layer == 0 or not buffer[:, : kernel - 1].any()
        # What is not zeroed is never read before written: the row drawn is the one from all-zero buffers.
        zeroed = copy.deepcopy(fast)
        for t in zeroed.h_buffers:
            t.zero_()
        uniforms, temperature = torch.rand((batch, c, w), dtype=torch.float64), torch.ones(batch, dtype=torch.float64)
        drawn, log_p = sampler.row_loop.draw_row(fast, uniforms, temperature)
        expected, expected_log_p = sampler.row_loop.draw_row(zeroed, uniforms, temperature)
        assert torch.equal(drawn, expected) and torch.equal(log_p, expected_log_p)
        row = canvas[:, :, i]
        sampler.impl.end_row(reference, row)
        sampler.row_loop.vertical.end_row(fast, row)
        assert all(torch.equal(a, b) for a, b in zip(torch_layout(sampler, fast).vertical[0], reference.vertical[0])), (
            "scaling is exact"
        )
        state = fast


@needs_compiler
def test_native_vertical_stack_numbers_do_not_depend_on_the_batch():
    """An image's row biases are bit for bit the same alone and among others, at any position."""
    model = tiny_model("gated", image_channels=3, num_classes=3, hidden_channels=18, dtype=torch.float32)
    sampler = CachedSampler(model)
    c, h, w = model.config.shape
    canvas = torch.randint(0, 256, (9, c, h, w), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(9) % 3
    crowd = sampler.prefill(canvas, labels, 3)
    alone = sampler.prefill(canvas[6:7], labels[6:7], 3)
    sampler.row_loop.vertical.begin_row(crowd)
    sampler.row_loop.vertical.begin_row(alone)
    for layer in range(len(model.layers)):
        assert torch.equal(crowd.row_bias[layer][6:7], alone.row_bias[layer])
        for a, b in zip(crowd.vertical[layer], alone.vertical[layer]):
            assert torch.equal(a[6:7], b)


@needs_compiler
def test_the_torch_vertical_stack_runs_without_the_native_kernel(monkeypatch):
    """native=False (and float64) keep the torch begin_row / end_row, the readable reference."""
    model = tiny_model("gated", dtype=torch.float32)
    reference = CachedSampler(model, native=False)
    assert reference.row_loop.name == "torchscript"
    assert CachedSampler(tiny_model("gated")).row_loop.name == "torchscript", (
        "float64 models run the torch vertical stack"
    )
    calls = []
    begin_row = type(reference.impl).begin_row
    monkeypatch.setattr(type(reference.impl), "begin_row", lambda self, s: calls.append(1) or begin_row(self, s))
    sample_cached(model, 2, seed=0, sampler=reference)
    assert len(calls) == model.config.height
    calls.clear()
    sample_cached(model, 2, seed=0, sampler=CachedSampler(model))
    assert not calls, "the native sampler runs the C vertical stack"
