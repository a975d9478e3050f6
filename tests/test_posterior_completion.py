"""Completion without a label infers the class from the kept rows: each image's class is drawn from
p(y | kept) (uniform prior), then the rest given that class, which is exact sampling from the
class-marginal model's p(rest | kept). Checked against the naive sampler (its own code), against Bayes'
rule over the model's own likelihoods, and by the distribution of many seeded completions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.engine import Engine, GenerationRequest, sample_cached
from app.engine.posterior import class_posterior, kept_log_likelihoods
from app.model import sample_naive
from tests.helpers import ARCH_CHANNELS, tiny_model

CLASSES = 4


def known_image(channels: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, channels, size, size), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def bayes_posterior(model, image: torch.Tensor, rows: int) -> torch.Tensor:
    """p(y | rows < `rows`) from the full image's log-likelihood under each class, summed over the kept rows."""
    x = image.long()
    with torch.no_grad():
        per_class = []
        for y in range(model.config.num_classes):
            log_p = torch.log_softmax(model(x, torch.tensor([y])).double(), dim=1)
            per_class.append(log_p.gather(1, x[:, None])[0, 0, :, :rows].sum())
    return torch.softmax(torch.stack(per_class), dim=0)


@pytest.mark.parametrize("arch,channels", ARCH_CHANNELS)
def test_posterior_completion_equals_naive_sampling(arch, channels):
    model = tiny_model(arch, channels, size=6, num_classes=CLASSES, seed=21)
    known = torch.cat([known_image(channels, 6, 1), known_image(channels, 6, 2)])
    for rows in (1, 3, 5):
        naive = sample_naive(model, 2, seed=rows, known=known, known_rows=rows)
        cached = sample_cached(model, 2, seed=rows, known=known, known_rows=rows)
        assert torch.equal(naive.labels, cached.labels)
        assert torch.equal(naive.images, cached.images)
        assert torch.equal(cached.images[:, :, :rows], known[:, :, :rows])
        torch.testing.assert_close(naive.class_log_probs, cached.class_log_probs, rtol=0, atol=1e-9)
        torch.testing.assert_close(naive.log_prob, cached.log_prob, rtol=0, atol=1e-9)


@pytest.mark.parametrize("arch,channels", ARCH_CHANNELS)
def test_the_posterior_is_bayes_rule_over_the_kept_rows(arch, channels):
    model = tiny_model(arch, channels, size=6, num_classes=CLASSES, seed=22)
    image = known_image(channels, 6, 3)
    for rows in (1, 4):
        got = class_posterior(kept_log_likelihoods(model, image.long(), rows * 6)).exp()[0]
        torch.testing.assert_close(got, bayes_posterior(model, image, rows), rtol=0, atol=1e-12)
    # The kept rows carry information: the posterior is not the uniform prior.
    assert got.max() - got.min() > 0.05


def test_prior_mode_and_given_labels_do_not_use_the_posterior():
    model = tiny_model("gated", 1, size=6, num_classes=CLASSES, seed=23)
    known = known_image(1, 6)
    prior = sample_cached(model, 8, seed=4, known=known, known_rows=3, label_mode="prior")
    naive_prior = sample_naive(model, 8, seed=4, known=known, known_rows=3, label_mode="prior")
    assert prior.class_log_probs is None and torch.equal(prior.images, naive_prior.images)
    # prior mode draws the labels exactly as a sample does (integers(K) first from each image's stream)
    assert torch.equal(prior.labels, sample_cached(model, 8, seed=4).labels)
    given = sample_cached(model, 8, seed=4, known=known, known_rows=3, labels=torch.tensor([2]))
    assert given.class_log_probs is None and given.labels.tolist() == [2] * 8
    nothing_kept = sample_cached(model, 8, seed=4, known=known, known_rows=0)
    assert nothing_kept.class_log_probs is None
    assert torch.equal(nothing_kept.images, sample_cached(model, 8, seed=4).images)
    with pytest.raises(ValueError, match="label_mode must be one of posterior, prior, got 'max'"):
        sample_cached(model, 1, seed=4, known=known, known_rows=3, label_mode="max")


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(statistic / 2)))


def test_completions_follow_the_class_marginal_conditional():
    """Sample many completions of one kept top; the joint distribution of (drawn class, first generated
    pixel) must be p(y | kept) p(x | kept, y) computed from the model's own softmax, and so the pixel's
    distribution is the class-marginal model's p(x | kept). A prior draw of the class fails this."""
    size, rows = 4, 3
    model = tiny_model("gated", 1, size=size, num_classes=CLASSES, seed=24, hidden_channels=8, dtype=torch.float32)
    with torch.no_grad():  # sharper class biases: the kept rows then say much about the class
        for layer in model.layers:
            layer.class_bias.weight.mul_(3)
    known = known_image(1, size, 5)
    posterior = bayes_posterior(model, known, rows)
    with torch.no_grad():
        x = known.long()
        pixel = torch.stack(
            [torch.softmax(model(x, torch.tensor([y])).double()[0, :, 0, rows, 0], 0) for y in range(CLASSES)]
        )
    joint = posterior[:, None] * pixel  # (K, 256): p(y, first generated pixel | kept)
    assert 0.05 < posterior.max() < 0.95, posterior  # informative, but every class is drawn sometimes

    # Cells: each class times 4 pixel bins of about equal marginal probability.
    marginal_cdf = joint.sum(0).cumsum(0)
    edges = [int((marginal_cdf < q).sum()) for q in (0.25, 0.5, 0.75)]
    bins = torch.bucketize(torch.arange(256), torch.tensor(edges), right=True)  # level -> bin 0..3
    expected_cells = torch.zeros(CLASSES, 4, dtype=torch.float64).index_add_(1, bins, joint)

    counts = torch.zeros(CLASSES, 4, dtype=torch.float64)
    for seed in range(48):
        result = sample_cached(model, 64, seed=seed, known=known, known_rows=rows)
        first = result.images[:, 0, rows, 0].long()
        counts.index_put_((result.labels, bins[first]), torch.ones(64, dtype=torch.float64), accumulate=True)
    total = counts.sum()
    expected = expected_cells.flatten() * total
    keep = expected > 5  # chi-square needs enough expected counts per cell
    observed = counts.flatten()[keep]
    p_value = chi_square_p_value(observed, expected[keep] * observed.sum() / expected[keep].sum())
    assert p_value > 1e-3, (counts, expected_cells * total)
    class_share = counts.sum(1) / total
    assert torch.allclose(class_share, posterior, atol=4 * math.sqrt(0.25 / float(total))), (class_share, posterior)


@pytest.mark.anyio
async def test_the_engine_draws_the_same_posterior_completions_on_any_lane_split():
    model = tiny_model("gated", 1, size=6, num_classes=CLASSES, seed=25, dtype=torch.float32)
    known = known_image(1, 6, 7)
    reference = sample_cached(model, 6, seed=9, known=known, known_rows=2)
    forward = model.forward
    scoring_passes = 0

    def counted(x, labels=None):  # a pass over the kept rows under every class: (K, C, kept rows, W)
        nonlocal scoring_passes
        scoring_passes += x.shape[0] == CLASSES and x.shape[2] == 2
        return forward(x, labels)

    model.forward = counted
    for lanes, step_images in ((1, None), (2, None), (1, 2), (2, 1)):
        scoring_passes = 0
        engine = Engine(model, lanes=lanes, step_images=step_images)
        await engine.start()
        try:
            request = GenerationRequest(n=6, seed=9, known=known.numpy(), known_rows=2)
            result = await engine.generate(request)
        finally:
            await engine.stop()
        assert scoring_passes == 1, "the kept rows are scored once per request, however many shards it has"
        assert np.array_equal(result.images, reference.images)
        assert np.array_equal(result.labels, reference.labels)
        np.testing.assert_allclose(result.class_log_probs, reference.class_log_probs, rtol=0, atol=0)
