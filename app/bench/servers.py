"""Servers the tools start for themselves: a free loopback port, and the app run in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL once the app has finished
    loading its models (successfully or not: /ready says which), stops it on exit."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=free_port(host), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="pixelcnn-bench-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started or app.state.registry.loading:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
