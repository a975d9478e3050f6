"""The checkpoints shipped in model_store/ load from safetensors, score real data as their metrics say,
and sample exactly (cached == naive) on their real weights. Kept fast: small slices of the test set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.data import load_dataset
from app.engine import sample_cached
from app.evaluate import evaluate
from app.model import load, sample_naive

pytestmark = pytest.mark.slow

STORE = Path(__file__).resolve().parent.parent / "model_store"
SHIPPED = ["fashion-mnist", "fashion-mnist-pixelcnn"]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    folder = STORE / request.param
    return folder, load(folder), json.loads((folder / "metrics.json").read_text())


def test_shipped_model_has_its_files_and_class_names(shipped):
    folder, model, metrics = shipped
    for name in ("config.json", "model.safetensors", "metrics.json", "README.md"):
        assert (folder / name).is_file(), f"{folder.name} is missing {name}"
    assert (folder / "model.safetensors").stat().st_size < 25 * 2**20
    assert model.config.class_names == FASHION_CLASSES
    assert metrics["test_images"] == 10000, "metrics must be measured on the full test split"
    assert model.config.arch == ("gated" if folder.name == "fashion-mnist" else "pixelcnn")


def test_shipped_model_scores_real_test_images_like_its_metrics(shipped):
    _, model, metrics = shipped
    torch.set_num_threads(1)
    result = evaluate(model, load_dataset("fashion-mnist", "test", limit=300), batch_size=100)
    # 300 images are a noisy estimate of the 10,000-image number: agree within 0.15 bits/dim.
    assert abs(result.bits_per_dim - metrics["test_bits_per_dim"]) < 0.15
    # And the model is far from uniform (8 bits/dim).
    assert result.bits_per_dim < 4.0


def test_shipped_model_completes_exactly_like_the_naive_sampler(shipped):
    _, model, _ = shipped
    model = model.double()  # pixel equality is compared in float64 (see the engine issue)
    image = load_dataset("fashion-mnist", "test", limit=1).images
    kwargs = dict(labels=torch.tensor([9]), known=image, known_rows=26)
    cached = sample_cached(model, 1, seed=0, **kwargs)
    naive = sample_naive(model, 1, seed=0, **kwargs)
    assert torch.equal(cached.images, naive.images)
    assert torch.equal(cached.images[:, :, :26], image[:, :, :26])


@pytest.mark.anyio
async def test_the_masked_conv_model_is_listed_as_a_baseline_with_its_accuracy(serve):
    """Nobody should mistake the seed-architecture model's near-noise samples for the product: /models marks
    it as a baseline, with a note that gives its measured sample accuracy; the default model is not one."""
    async with serve(model_store=STORE, model="fashion-mnist") as (_, client):
        models = {m["name"]: m for m in (await client.get("/models")).json()}
    baseline, default = models["fashion-mnist-pixelcnn"], models["fashion-mnist"]
    assert baseline["baseline"] and not default["baseline"] and default["default"]
    accuracy = baseline["metrics"]["sample_class_accuracy"]
    assert f"{accuracy:.1%}" in baseline["note"] and "baseline" in baseline["note"].lower()
    assert default["note"] is None or "baseline" not in default["note"].lower()
