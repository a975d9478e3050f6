"""Batch invariance in the served dtype: a request gives byte-identical images and log-probabilities
whether it runs alone or in a crowd, at any position in the batch, next to requests at other rows, in
any lane. float32, one torch thread per lane: how the server runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine import GenerationRequest
from app.engine.cached import CachedSampler
from app.model import load
from tests.helpers import check_invariance, tiny_model

SHIPPED = Path(__file__).resolve().parent.parent / "model_store" / "fashion-mnist"


@pytest.mark.parametrize("arch", ["gated", "pixelcnn"])
@pytest.mark.parametrize("hidden", [12, 24])  # 2n = 24 or 48 floats: neither fills whole 32-float chunks
def test_small_models_in_float32_give_the_same_bytes_alone_and_in_any_crowd(arch, hidden):
    model = tiny_model(arch, 1, size=8, num_classes=3, seed=40, dtype=torch.float32, hidden_channels=hidden)
    known = torch.randint(0, 256, (1, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    targets = [
        GenerationRequest(n=1, seed=7, labels=[2]),
        GenerationRequest(n=3, seed=8, temperature=0.9),
        GenerationRequest(n=1, seed=9, labels=[0], known=known, known_rows=3),
    ]
    check_invariance(model, targets, [(1, 0, 0), (0, 5, 0), (4, 3, 2), (9, 6, 5)])


def test_rgb_model_in_float32_is_batch_invariant():
    model = tiny_model("gated", 3, size=6, seed=41, dtype=torch.float32, hidden_channels=12)
    check_invariance(model, [GenerationRequest(n=2, seed=3)], [(3, 2, 1), (7, 0, 4)], lanes=(1,))


# hidden 12: 2n = 24 floats, padded to chunks; 16: 2n = 32, so only the torch loop's 2-image minimum pads
@pytest.mark.parametrize("native,hidden", [(True, 12), (False, 12), (False, 16)])
def test_every_batch_size_gives_each_image_the_same_row(native, hidden):
    """Below the engine: one row of the same images decoded inside batches of 1..40 others, by the C kernel
    and by the TorchScript reference row loop (which pads every step to its own batch rule)."""
    model = tiny_model("gated", 1, size=8, num_classes=3, seed=42, dtype=torch.float32, hidden_channels=hidden)
    sampler = CachedSampler(model, native=native)
    assert sampler.row_loop.name == ("c-kernel" if native else "torchscript")
    config = model.config
    g = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, 256, (41, *config.shape), generator=g)
    labels = torch.randint(0, 3, (41,), generator=g)
    uniforms = torch.rand((41, 1, 8), generator=g, dtype=torch.float64)
    temperature = torch.ones((41, 1), dtype=torch.float64)

    def one_row(index: list[int]):
        state = sampler.prefill(canvas[index], labels[index], 4)
        return sampler.decode_row(state, uniforms[index], temperature[index])

    row0, lp0 = one_row([0])
    for size in range(2, 41):
        for position in (0, size // 2, size - 1):
            index = list(range(1, size))
            index.insert(position, 0)
            rows, lp = one_row(index)
            assert np.array_equal(rows[position], row0[0]) and np.array_equal(lp[position], lp0[0]), (size, position)


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_dir(), reason="needs the shipped model")
def test_the_shipped_model_gives_the_same_bytes_alone_and_in_a_crowd():
    """The issue's scenario: a seeded n=1 request alone, and while 15 others share its decode steps."""
    model = load(SHIPPED)
    targets = [GenerationRequest(n=1, seed=153, labels=[9]), GenerationRequest(n=2, seed=4, labels=[0, 7])]
    check_invariance(model, targets, [(15, 0, 3), (2, 9, 10)], lanes=(2,))
