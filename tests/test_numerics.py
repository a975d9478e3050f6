"""Machine-independent generation (README, "Reproducibility across machines"): a completion's known rows go
through the C kernel's own arithmetic (the very numbers decoding them would leave), the kernel's numbers
do not depend on the vector width, on which oneDNN, MKL, ATen or libm code the CPU selects, and every
/sample and /complete response says which arithmetic served it (`numerics`, X-Numerics)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine import CachedSampler, c_library
from app.engine.c_library import NUMERICS_VERSION, load_kernel
from app.engine.protocol import image_streams, row_uniforms
from tests.helpers import sse_events, tiny_model, torch_layout, torch_threads

needs_kernel = pytest.mark.skipif(load_kernel() is None, reason="no C compiler: the kernel does not build here")
PORTABLE = f"c-kernel/{NUMERICS_VERSION}; portable"
STORE = Path(__file__).resolve().parent.parent / "model_store"
MODELS = [("gated", 1, 0), ("gated", 3, 4), ("pixelcnn", 1, 4), ("pixelcnn", 3, 0)]  # arch, channels, classes


def persistent(state) -> list[torch.Tensor]:
    """The caches that carry over from row to row (not the per-row scratch a row's begin_row resets)."""
    names = ("labels", "vertical", "v_bias", "h_bias", "input_bias", "inputs", "conv_inputs")
    out = []
    for name in names:
        value = getattr(state, name, None)
        while isinstance(value, list) and value and isinstance(value[0], list):
            value = [t for part in value for t in part]
        out += value if isinstance(value, list) else [] if value is None else [value]
    return out


def decode(sampler: CachedSampler, state, rows: range, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `rows` of every image from `state` with seeded uniforms: values (B, C, rows, W), log p (B,)."""
    config = sampler.config
    streams = image_streams(seed, state.batch)
    temperature = torch.ones((state.batch, 1), dtype=torch.float64)
    drawn, log_prob = [], torch.zeros(state.batch, dtype=torch.float64)
    for _ in rows:
        row, lp = sampler.decode_row(state, row_uniforms(streams, config.image_channels, config.width), temperature)
        drawn.append(row)
        log_prob += lp
    return torch.stack(drawn, dim=2), log_prob


@needs_kernel
@pytest.mark.parametrize("arch,channels,classes", MODELS)
def test_known_rows_prefill_to_the_numbers_decoding_them_leaves(arch, channels, classes):
    """Decode rows 0..4, then prefill a canvas holding those rows: the caches are the same bits, and so is
    every row decoded after them (the prefill is the decode's own arithmetic, not a convolution)."""
    model = tiny_model(arch, channels, num_classes=classes, dtype=torch.float32, seed=5)
    sampler = CachedSampler(model)
    assert sampler.numerics == PORTABLE
    b, known = 3, 5
    labels = torch.tensor([0, 2, 1]) if classes else None
    canvas = torch.zeros((b, *model.config.shape), dtype=torch.long)
    with torch_threads(1):
        decoded = sampler.prefill(canvas, labels, 0)
        canvas[:, :, :known], _ = decode(sampler, decoded, range(known), seed=1)
        prefilled = sampler.prefill(canvas, labels, known)
        assert len(persistent(decoded)) == len(persistent(prefilled)) > 1
        for a, p in zip(persistent(decoded), persistent(prefilled)):
            assert torch.equal(a, p)
        rest = range(known, model.config.height)
        after_decoded, after_prefilled = decode(sampler, decoded, rest, 2), decode(sampler, prefilled, rest, 2)
    assert torch.equal(after_decoded[0], after_prefilled[0])
    assert torch.equal(after_decoded[1], after_prefilled[1])


@needs_kernel
@pytest.mark.parametrize("arch,channels,classes", MODELS)
def test_kernel_prefill_is_the_torch_prefill_up_to_rounding_and_batch_invariant(arch, channels, classes):
    model = tiny_model(arch, channels, num_classes=classes, dtype=torch.float32, seed=6)
    kernel, reference = CachedSampler(model), CachedSampler(model, native=False)
    canvas = torch.randint(0, 256, (3, *model.config.shape), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 0, 3]) if classes else None
    with torch_threads(1):
        together = kernel.prefill(canvas, labels, 6)
        alone = [kernel.prefill(canvas[i : i + 1], None if labels is None else labels[i : i + 1], 6) for i in range(3)]
        torch_state = reference.prefill(canvas, labels, 6)
    for ours, theirs in zip(persistent(torch_layout(kernel, together)), persistent(torch_state)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert ours.shape == theirs.shape
    for i, single in enumerate(alone):
        for batched, own in zip(persistent(together), persistent(single)):
            assert torch.equal(batched[i : i + 1], own), f"image {i}'s caches depend on its batch"


def test_numerics_names_the_arithmetic_and_whether_it_is_portable():
    model = tiny_model("pixelcnn", 1, dtype=torch.float64)
    assert CachedSampler(model).numerics == "torchscript/cpu/float64; local"
    float32 = model.float()
    assert CachedSampler(float32, native=False).numerics == "torchscript/cpu/float32; local"
    assert CachedSampler(float32, compiled=False).numerics == "eager/cpu/float32; local"


def fingerprints(env: dict[str, str]) -> dict[str, str]:
    """Seeded /sample-like and /complete-like results of both shipped models from a fresh process with
    `env`: {what: SHA-256 of the images and the log_prob bits}, and each sampler's numerics."""
    script = """
import hashlib, json, sys, torch
from app.data import load_dataset
from app.engine import CachedSampler, sample_cached
from app.model import load
torch.set_num_threads(1)
known = torch.as_tensor(load_dataset("fashion-mnist", "test", limit=10).images[9:10])
out = {}
for name in sys.argv[1:]:
    model = load(f"model_store/{name}")
    sampler = CachedSampler(model)
    out[name + " numerics"] = sampler.numerics
    for what, kwargs in {"sample": {}, "complete": {"known": known, "known_rows": 11}}.items():
        r = sample_cached(model, 3, seed=4, labels=torch.tensor([2, 5, 9]), sampler=sampler, **kwargs)
        digest = hashlib.sha256(r.images.numpy().tobytes() + str([float(v).hex() for v in r.log_prob]).encode())
        out[f"{name} {what}"] = digest.hexdigest()
print(json.dumps(out))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, "fashion-mnist", "fashion-mnist-pixelcnn"],
        cwd=STORE.parent,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


# What differs on another x86-64 CPU, as far as one machine can make it differ: the kernel built without
# AVX-512 or AVX (SSE2 only), and torch's libraries on their older code paths (oneDNN's JIT kernels, MKL's
# BLAS and vector math, ATen's vectorised elementwise ops, glibc's libm without its FMA variants).
ANOTHER_CPU = {
    "PIXELCNN_KERNEL_MARCH": "x86-64",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    "ATEN_CPU_CAPABILITY": "default",
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F",
}


@pytest.mark.slow
@needs_kernel
@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 code paths")
def test_the_kernel_gives_the_same_bytes_on_another_cpu_where_torch_does_not(tmp_path):
    fresh = {"PIXELCNN_KERNEL_CACHE": str(tmp_path / "kernels")}
    here, there = fingerprints(fresh), fingerprints({**fresh, **ANOTHER_CPU})
    assert here == there
    assert here["fashion-mnist numerics"] == PORTABLE
    # The same switches do change what torch computes: the check above is not vacuous.
    torch_here = fingerprints({**fresh, "PIXELCNN_NATIVE_KERNEL": "0"})
    torch_there = fingerprints({**fresh, "PIXELCNN_NATIVE_KERNEL": "0", **ANOTHER_CPU})
    assert torch_here["fashion-mnist numerics"] == "torchscript/cpu/float32; local"
    assert torch_here["fashion-mnist complete"] != torch_there["fashion-mnist complete"]
    assert torch_here["fashion-mnist-pixelcnn complete"] != torch_there["fashion-mnist-pixelcnn complete"]


@pytest.mark.anyio
async def test_generation_responses_carry_the_numerics_fingerprint(serve):
    async with serve() as (_, client):
        json_answer = await client.post("/sample", json={"n": 2, "seed": 3})
        png_answer = await client.post("/sample", json={"seed": 3}, headers={"Accept": "image/png"})
        stream = await client.post("/sample", json={"seed": 3, "stream": True})
        upload = {"image": ("x.png", png_answer.content, "image/png")}
        completion = await client.post("/complete", data={"rows": "3", "seed": "1"}, files=upload)
        rgb = await client.post("/sample", json={"model": "rgb", "seed": 3})
        openai = await client.post("/v1/images/generations", json={"prompt": "", "seed": 3})
        v2 = await client.post("/v2/models/gray/generate", json={"seed": 3})
        v2_stream = await client.post("/v2/models/gray/generate_stream", json={"seed": 3})
    for answer in (json_answer, png_answer, stream, completion, rgb, openai, v2, v2_stream):
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-numerics"] == PORTABLE
    assert json_answer.json()["numerics"] == completion.json()["numerics"] == v2.json()["numerics"] == PORTABLE
    assert sse_events(stream.text)[-1][1]["numerics"] == PORTABLE


@pytest.mark.anyio
async def test_the_torch_fallback_says_its_bytes_are_this_machines_only(serve, monkeypatch):
    monkeypatch.setenv("PIXELCNN_NATIVE_KERNEL", "0")
    async with serve() as (_, client):
        answer = await client.post("/sample", json={"seed": 3})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-numerics"] == answer.json()["numerics"] == "torchscript/cpu/float32; local"


def correctly_rounded(exact: Fraction) -> np.float32:
    """The float32 nearest to an exact rational (ties to even): what IEEE 754's fused multiply-add returns."""
    near = np.float32(float(exact))  # within one float32 step of it (rounded twice)
    candidates = [near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf))]
    return min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.array(v).view(np.uint32)) & 1))


# acc + x * w where rounding the exact result to double first, then to float, gives the wrong float: the
# product's tail lies below double precision, just under (first) or over (second) a float half-way point.
DOUBLE_ROUNDING_TRAPS = [
    (2.0**-12 * (1 + 2.0**-20), 2.0**-12 * (1 - 2.0**-20), 1 + 2.0**-23),
    (2.0**-12 * (1 - 2895 * 2.0**-23), 2.0**-12 * (1 + 2896 * 2.0**-23), 1.0),
]


@needs_kernel
@pytest.mark.parametrize("march", ["native", "x86-64"])
def test_the_kernels_fused_multiply_adds_round_once(march, tmp_path, monkeypatch):
    """The kernel's products join their sums with one rounding, as IEEE 754's FMA: on the CPU's own FMA
    instruction (native here) and in the exact emulation of a CPU without one (built for plain x86-64),
    lane by lane of a vector; checked against exact rational arithmetic, on random values and on
    values where rounding twice (to double, then to float) would be wrong."""
    if march == "x86-64" and os.uname().machine != "x86_64":
        pytest.skip("x86-64 code paths")
    monkeypatch.setenv("PIXELCNN_KERNEL_MARCH", march)
    monkeypatch.setenv("PIXELCNN_KERNEL_CACHE", str(tmp_path))
    library = ctypes.CDLL(str(c_library.build(c_library._compiler())))
    if march == "x86-64":
        assert library.kernel_hardware_fma() == 0, "plain x86-64 has no FMA instruction: the emulation runs"
    floats = ctypes.POINTER(ctypes.c_float)
    library.kernel_fused.argtypes = [ctypes.c_float, floats, floats, floats]
    generator = np.random.default_rng(0)
    cases = [tuple(np.float32(v) for v in trap) for trap in DOUBLE_ROUNDING_TRAPS]
    cases += [tuple(np.float32(v) for v in generator.standard_normal(3) * [1, 1, 4]) for _ in range(500)]
    for x, w, acc in cases:
        exact = Fraction(float(x)) * Fraction(float(w)) + Fraction(float(acc))
        expected = correctly_rounded(exact)
        ws, accs = np.full(16, w, dtype=np.float32), np.full(16, acc, dtype=np.float32)
        vector = np.zeros(16, dtype=np.float32)
        lanes = library.kernel_fused(ctypes.c_float(x), *(a.ctypes.data_as(floats) for a in (ws, accs, vector)))
        assert lanes in (4, 8, 16)
        assert (vector[:lanes] == expected).all(), (x, w, acc)
    for x, w, acc in cases[:2]:  # the traps are traps: rounding twice gets them wrong
        assert np.float32(float(x) * float(w) + float(acc)) != correctly_rounded(
            Fraction(float(x)) * Fraction(float(w)) + Fraction(float(acc))
        )
