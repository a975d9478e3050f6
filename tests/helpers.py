"""Small random models shared by the tests (no training needed)."""

from __future__ import annotations

import subprocess
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
    """A real `pixelcnn serve` of `store` on a free loopback port (one lane, one thread), once /ready says
    so: (process, url); `process.log_path` is its log."""
    import tempfile

    import pytest

    from app.bench.gateway import Replica

    replica = Replica(store, Path(tempfile.mkdtemp(prefix="pixelcnn-serve-")), env=env)
    replica.process.log_path = replica.log_path
    try:
        replica.wait_ready(60)
    except RuntimeError as error:
        replica.stop()
        pytest.fail(f"server did not become ready: {error}")
    return replica.process, replica.url
