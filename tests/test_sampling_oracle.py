"""The sampling rule and the likelihood, checked against first principles rather than against other code
of this package: frequencies of many draws against softmax(logits / T) (chi-square), degenerate and
extreme cases, and the NLL against a sum of log-softmax values written out here."""

from __future__ import annotations

import math

import pytest
import torch

from app.engine import MAX_TEMPERATURE, MIN_TEMPERATURE, Engine
from app.engine.protocol import draw
from app.model import sample_naive
from tests.helpers import tiny_model

DRAWS = 200_000


def chi_square_critical(dof: int, z: float = 4.0) -> float:
    """Upper quantile of chi-square(dof) at about 3e-5 (Wilson-Hilferty), so a correct sampler fails
    this test about once in 30,000 runs, and a wrong one (a changed distribution) every time."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square_fits(observed: torch.Tensor, expected: torch.Tensor) -> tuple[bool, float]:
    """Pearson's chi-square of counts per level, the rare levels pooled into one bin so that every bin
    expects at least 20 draws."""
    big = expected >= 20
    obs, exp = observed[big], expected[big]
    if (~big).any():
        obs, exp = torch.cat([obs, observed[~big].sum()[None]]), torch.cat([exp, expected[~big].sum()[None]])
    statistic = ((obs - exp) ** 2 / exp).sum().item()
    return statistic < chi_square_critical(len(obs) - 1), statistic


def frequencies(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    u = torch.rand(DRAWS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values, _ = draw(logits.expand(DRAWS, -1), u, torch.tensor(temperature, dtype=torch.float64))
    return torch.bincount(values, minlength=256).double()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draw_frequencies_follow_softmax_of_logits_over_t(temperature):
    logits = torch.randn(256, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    observed = frequencies(logits[None], temperature)
    expected = DRAWS * torch.exp(logits / temperature - torch.logsumexp(logits / temperature, 0))
    fits, statistic = chi_square_fits(observed, expected)
    assert fits, statistic


@pytest.mark.parametrize("level", [0, 1, 127, 254, 255])
def test_a_one_hot_distribution_always_gives_its_level(level):
    logits = torch.full((1, 256), -1000.0, dtype=torch.float64)  # exp(-1030) is exactly 0 in float64
    logits[0, level] = 30.0
    u = torch.tensor([0.0, 1e-12, 0.3, 0.5, 1 - 1e-12, 1 - 2**-53], dtype=torch.float64)  # torch.rand's range
    values, log_p = draw(logits.expand(len(u), -1), u, torch.tensor(1.0, dtype=torch.float64))
    assert values.tolist() == [level] * len(u)
    assert torch.all(log_p > -1e-20)


def test_the_smallest_temperature_gives_the_argmax_and_never_overflows():
    logits = torch.randn(64, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    best = logits.argmax(dim=1)
    logits[torch.arange(64), best] += 3.0  # a gap of 3 nats: at T=0.05 the runner-up has p < e^-60
    logits = logits.to(torch.float32)  # the served dtype
    u = torch.rand(64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    values, log_p = draw(logits, u, torch.tensor(MIN_TEMPERATURE, dtype=torch.float64))
    assert torch.equal(values, best)
    assert torch.isfinite(log_p).all()
    values, log_p = draw(logits * 1e4, u, torch.tensor(MIN_TEMPERATURE, dtype=torch.float64))
    assert torch.equal(values, (logits * 1e4).argmax(dim=1)) and torch.isfinite(log_p).all()


def test_temperature_divides_the_logits():
    logits = torch.randn(500, 256, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u = torch.rand(500, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    for t in (MIN_TEMPERATURE, 0.5, 3.0, MAX_TEMPERATURE):
        at_t, log_p = draw(logits, u, torch.tensor(t, dtype=torch.float64))
        scaled, _ = draw(logits / t, u, one)
        assert (at_t != scaled).sum() <= 1  # the same draws, up to rounding on a CDF boundary
        # log p is reported at temperature 1, whatever T was used to draw
        expected = torch.log_softmax(logits, 1).gather(1, at_t[:, None])[:, 0]
        torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-12)


def test_the_naive_sampler_follows_the_distribution_too():
    """The reference's own inverse CDF, on a model whose logits do not depend on the pixels (all weights
    zero, a bias on the output): each sub-pixel is an independent draw from softmax(bias / T)."""
    model = tiny_model("gated", 1, size=4, seed=7)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        bias = torch.randn(256, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        model.head.logits.bias.copy_(bias)
    t = 0.7
    result = sample_naive(model, 200, temperature=t, seed=9)
    observed = torch.bincount(result.images.flatten().long(), minlength=256).double()
    expected = observed.sum() * torch.softmax(bias / t, 0)
    fits, statistic = chi_square_fits(observed, expected)
    assert fits, statistic


def direct_nll(model, images: torch.Tensor, label: int | None) -> torch.Tensor:
    """-sum over sub-pixels of log softmax(logits)[true level], written out: (N,) nats."""
    labels = None if label is None else torch.full((images.shape[0],), label)
    logits = model(images.long(), labels).double()  # (N, 256, C, H, W)
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    picked = torch.gather(log_p, 1, images.long()[:, None]).squeeze(1)  # (N, C, H, W)
    return -picked.sum(dim=(1, 2, 3))


def test_engine_likelihood_equals_a_direct_sum_of_log_softmax():
    model = tiny_model("gated", 3, size=6, num_classes=3, seed=10)
    images = torch.randint(0, 256, (4, 3, 6, 6), generator=torch.Generator().manual_seed(11), dtype=torch.uint8)
    engine = Engine(model)
    for label in range(3):
        result = engine.scorer.score_sync(images, torch.tensor([label] * 4))
        torch.testing.assert_close(
            torch.from_numpy(result.nll_nats), direct_nll(model, images, label), rtol=0, atol=1e-9
        )
        per_pixel = torch.from_numpy(result.per_pixel).double().sum(dim=(1, 2, 3))
        torch.testing.assert_close(per_pixel, direct_nll(model, images, label), rtol=0, atol=1e-9)
    # No label: -log (1/K sum_y p(x | y)), from the three conditional NLLs above.
    per_class = torch.stack([direct_nll(model, images, y) for y in range(3)], dim=1)
    marginal = -(torch.logsumexp(-per_class, dim=1) - math.log(3))
    result = engine.scorer.score_sync(images)
    torch.testing.assert_close(torch.from_numpy(result.nll_nats), marginal, rtol=0, atol=1e-9)
    assert torch.equal(torch.from_numpy(result.labels), per_class.argmin(dim=1))
