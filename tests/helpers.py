"""Small random models shared by the tests (no training needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

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
    """A real `pixelcnn serve` of `store` on a free loopback port, once /ready says so: (process, url)."""
    import httpx
    import pytest

    import tempfile

    from app.server.bench import free_port

    port = free_port()
    env = {**os.environ, **(env or {})}
    # The log goes to a file: a pipe nobody reads fills up (an access line per request) and blocks the server.
    log = tempfile.NamedTemporaryFile("w+", prefix="pixelcnn-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--model-store", str(store), "--port", str(port),
         "--threads", "1", "--lanes", "1", "--device", "cpu"],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    process.log_path = Path(log.name)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"server did not become ready: {process.log_path.read_text()}")
