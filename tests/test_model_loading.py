"""Models load in the background once the server listens: /health answers 200 at once, /ready answers
503 "loading models" and the POST routes 503 not_ready until the load is done; a failed load is reported
by /ready; a SIGTERM during the load drains and stops the server without waiting for the load (the
process itself exits once the load's thread is done: a thread inside torch cannot be stopped safely).

The slow load is the real `load_models` held in its worker thread until the test lets it go."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest
import torch

import app.server.registry as registry_module
from app.bench.servers import free_port
from app.server import Settings, create_app
from app.server.cli import draining_server_class
from tests.helpers import torch_threads


class HeldLoad:
    """Replaces registry.load_models: the real load, run only once `release` is set."""

    def __init__(self) -> None:
        self.started, self.release, self.finished = threading.Event(), threading.Event(), threading.Event()
        self.real = registry_module.load_models

    def __call__(self, settings: Settings):
        self.started.set()
        try:
            if not self.release.wait(120):
                raise TimeoutError("the test never released the load")
            return self.real(settings)
        finally:
            self.finished.set()


@pytest.fixture
def held_load(monkeypatch):
    held = HeldLoad()
    monkeypatch.setattr(registry_module, "load_models", held)
    yield held
    held.release.set()  # a thread still waiting finishes (its result is dropped) before the next test
    if held.started.is_set():
        assert held.finished.wait(60)


def settings_for(store, **overrides) -> Settings:
    return Settings(model_store=store, model="gray", device="cpu", threads=1, **overrides)


@pytest.mark.anyio
async def test_health_answers_and_ready_is_503_while_the_models_load(server_store, held_load):
    app = create_app(settings_for(server_store))
    with torch_threads(torch.get_num_threads()):
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                assert await asyncio.to_thread(held_load.started.wait, 30), "the load never started"
                assert (await client.get("/health")).status_code == 200

                ready = await client.get("/ready")
                assert ready.status_code == 503
                body = ready.json()
                assert body["status"] == "not_ready" and body["reason"] == "loading models"
                assert body["error"]["type"] == "not_ready"

                refused = await client.post("/sample", json={"n": 1, "seed": 1})
                assert refused.status_code == 503
                assert refused.json()["error"]["type"] == "not_ready"
                assert "loading its models" in refused.json()["error"]["message"]

                held_load.release.set()
                deadline = time.monotonic() + 30
                while (ready := await client.get("/ready")).status_code != 200:
                    assert time.monotonic() < deadline, ready.text
                    await asyncio.sleep(0.02)
                assert ready.json()["models"] == ["cond", "gray", "rgb"]
                sampled = await client.post("/sample", json={"n": 1, "seed": 1})
                assert sampled.status_code == 200 and sampled.json()["model"] == "gray"


@pytest.mark.anyio
async def test_a_failed_load_is_reported_by_ready(serve, monkeypatch):
    def broken_load(settings):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(registry_module, "load_models", broken_load)
    async with serve() as (app, client):
        assert (await client.get("/health")).status_code == 200
        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["reason"] == "loading the models failed (RuntimeError: disk on fire)"
        refused = await client.post("/sample", json={"n": 1})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"


def test_sigterm_during_the_load_drains_and_stops_without_waiting_for_it(server_store, held_load):
    """A real uvicorn (pixelcnn serve's DrainingServer) on a port: it listens while the load is held, and
    the SIGTERM handler drains it (/ready 503 "shutting down") and stops it with the load still held."""
    import uvicorn

    settings = settings_for(server_store, port=free_port(), shutdown_notice_s=0.5)
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning", access_log=False)
    server = draining_server_class()(config, app, settings)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    url = f"http://127.0.0.1:{settings.port}"
    with torch_threads(torch.get_num_threads()):
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        assert held_load.started.wait(30)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert httpx.get(f"{url}/ready", timeout=5).json()["reason"] == "loading models"

        server.handle_exit(signal.SIGTERM, None)
        time.sleep(0.1)
        ready = httpx.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["reason"] == "the server is shutting down"
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop while its load was held"
    assert not held_load.release.is_set()  # it stopped with the load still running
    assert app.state.registry.models == {}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)
