"""Shared fixtures: a tiny .npz dataset and a tiny model trained on it once per session (a few seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_MODEL_ARGS, torch_threads, write_server_store, write_tiny_npz

# One torch thread for the whole suite: the models are tiny, results do not depend on the thread count,
# and on a machine whose other core is busy, OpenMP threads that spin-wait make tests many times slower.
torch.set_num_threads(1)


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


@pytest.fixture
def anyio_backend():
    """The server tests run on asyncio (the event loop uvicorn uses)."""
    return "asyncio"


@pytest.fixture(scope="module")
def models(server_store):
    """The tiny server-store models loaded in the test process, to compare responses with."""
    from app.model import load

    return {name: load(server_store / name) for name in ("gray", "cond", "rgb")}
