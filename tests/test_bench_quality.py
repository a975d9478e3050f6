"""The sample-quality benchmark's arithmetic: the Frechet distance against closed forms."""

from __future__ import annotations

import torch

from app.bench.quality import Classifier, frechet_distance


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, -2.0])
    # N(0, I) vs N(mu, 4 I): |mu|^2 + tr(I + 4I - 2 * 2I) = 5 + 3
    assert abs(frechet_distance(a, b) - 8.0) < 0.15
    assert abs(frechet_distance(a, a)) < 1e-8


def test_the_classifier_gives_128_features_and_10_logits():
    model = Classifier().eval()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    assert model.features(images).shape == (4, 128) and model(images).shape == (4, 10)
