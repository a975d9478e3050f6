"""Shared fixtures: a tiny .npz dataset and a tiny model trained on it once per session (a few seconds on CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

# One torch thread for the whole suite: the models are tiny, results do not depend on the thread count,
# and on a machine whose other core is busy, OpenMP threads that spin-wait make tests many times slower.
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory, tiny_npz: Path) -> Path:
    """Folder of a tiny gated model trained 2 epochs on tiny_npz with `pixelcnn train`."""
    from app.cli import main

    root = tmp_path_factory.mktemp("trained")
    with torch_threads(1):
        code = main(
            [
                "train",
                "--data",
                str(tiny_npz),
                *TINY_MODEL_ARGS,
                "--checkpoint-dir",
                str(root / "ck"),
                "--out",
                str(root / "m"),
            ]
        )
    assert code == 0
    return root / "m"


# --- HTTP server fixtures (tests/test_server*.py, tests/test_client.py) ---------------------------------

SERVER_CLASS_NAMES = ["T-shirt/top", "Sneaker", "Ankle boot"]


def write_server_store(root: Path) -> Path:
    """A model store of tiny random float32 models: 'gray' (gated, 1x8x8), 'cond' (gated, 3 named classes),
    'rgb' (masked-conv PixelCNN, 3x8x8), plus a metrics.json with a history for 'gray'."""
    import json

    from helpers import tiny_model

    from app.model import save

    save(tiny_model("gated", 1, seed=1).float(), root / "gray")
    cond = tiny_model("gated", 1, num_classes=3, seed=2).float()
    cond.config.class_names = list(SERVER_CLASS_NAMES)
    save(cond, root / "cond")
    save(tiny_model("pixelcnn", 3, seed=3).float(), root / "rgb")
    metrics = {"dataset": "tiny", "test_bits_per_dim": 7.5, "history": [{"step": 1, "loss": 5.0}]}
    (root / "gray" / "metrics.json").write_text(json.dumps(metrics))
    return root


@pytest.fixture(scope="session")
def server_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_server_store(tmp_path_factory.mktemp("model_store"))


@pytest.fixture
def serve(server_store: Path):
    """`async with serve(**settings) as (app, client)`: the real app on the test store, lifespan run, with an
    httpx.AsyncClient on it. Settings default to the store above, 'gray' as the default model, 1 torch thread
    (batched decoding with 2 threads on this busy 2-core machine is ~100x slower)."""
    import asyncio
    from contextlib import asynccontextmanager

    import httpx

    from app.server import Settings, create_app

    @asynccontextmanager
    async def run(engine_factory=None, **overrides):
        defaults = {"model_store": server_store, "model": "gray", "device": "cpu", "threads": 1}
        settings = Settings(**{**defaults, **overrides})
        app = create_app(settings, engine_factory=engine_factory)
        with torch_threads(torch.get_num_threads()):  # the app sets 1 thread process-wide: restore it after
            async with app.router.lifespan_context(app):
                while app.state.registry.loading:  # the models load in the background; wait for the outcome
                    await asyncio.sleep(0.01)
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                    yield app, client

    return run


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


@pytest.fixture
def anyio_backend():
    """The server tests run on asyncio (the event loop uvicorn uses)."""
    return "asyncio"


@pytest.fixture(scope="module")
def models(server_store):
    """The tiny server-store models loaded in the test process, to compare responses with."""
    from app.model import load

    return {name: load(server_store / name) for name in ("gray", "cond", "rgb")}


def without_request_id(body: dict, response) -> dict:
    """An error body minus its request_id, after checking that the id is the response's X-Request-ID."""
    error = dict(body["error"])
    assert error.pop("request_id") == response.headers["x-request-id"]
    return {"error": error}
