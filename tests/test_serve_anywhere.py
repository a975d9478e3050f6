"""`pixelcnn serve` started from any folder serves the shipped models (or says where it looked and how to
point it elsewhere), and prints the demo and /docs URLs once ready."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.bench.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def serve_from(cwd: Path, **env: str) -> Iterator[tuple[str, Path]]:
    """`pixelcnn serve` without --model-store, started in `cwd`; PIXELCNN_MODEL_STORE only if given in env.
    Yields (url, log file); the process is killed afterwards."""
    port = free_port()
    base = {key: value for key, value in os.environ.items() if key != "PIXELCNN_MODEL_STORE"}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))  # checkout or install
    command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--lanes", "1", "--threads", "1"]
    command += ["--device", "cpu", "--preload", "default"]
    log_path = cwd / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        process.kill()
        process.wait(30)


def wait_loaded(url: str, log_path: Path, timeout_s: float = 90.0) -> httpx.Response:
    """/ready once the server has finished loading (200, or 503 with the problem instead of 'loading')."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{url}/ready", timeout=2)
            if ready.status_code == 200 or "loading" not in ready.text and "starting" not in ready.text:
                return ready
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server at {url} did not finish loading: {log_path.read_text()[-2000:]}")


def test_serve_from_another_folder_serves_the_shipped_default_model(tmp_path):
    with serve_from(tmp_path) as (url, log_path):
        ready = wait_loaded(url, log_path)
        assert ready.status_code == 200, ready.text
        assert ready.json()["default"] == "fashion-mnist"
        sample = httpx.post(f"{url}/sample", json={"n": 1, "seed": 1, "label": "bag"}, timeout=60)
        assert sample.status_code == 200 and sample.json()["shape"] == [1, 28, 28]
        time.sleep(0.5)  # the ready line is logged right after /ready turns 200
        log = log_path.read_text()
    assert f"the web demo is at {url}/ and the API docs at {url}/docs" in log, log


def test_serve_without_a_model_store_says_where_it_looked_and_how_to_point_it(tmp_path):
    missing = tmp_path / "no-such-store"
    with serve_from(tmp_path, PIXELCNN_MODEL_STORE=str(missing)) as (url, log_path):
        ready = wait_loaded(url, log_path)
        assert ready.status_code == 503
        log = log_path.read_text()
    line = next(line for line in log.splitlines() if "does not exist" in line)
    assert str(missing) in line and "--model-store DIR" in line and "PIXELCNN_MODEL_STORE" in line, line
    assert "/docs" not in log  # no "ready" line when nothing is served
