"""The sampling protocol shared by every sampler, and the naive reference sampler.

Protocol (what makes two samplers produce the same images from the same seed):
1. A class-conditional model without given labels draws them first: randint(K, (n,)).
2. At the start of every row that is generated, one block of uniforms U of shape (n, C, W) is drawn in
   float64. Sub-pixel (c, j) of image b is then the inverse CDF of softmax(logits / T) at U[b, c, j].
Drawing per row (not per pixel) lets a batching scheduler serve many requests with one generator each
without a Python call per request per pixel; drawing in float64 keeps the CDF comparison away from
float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig


@dataclass
class SampleResult:
    images: torch.Tensor  # uint8 (n, C, H, W)
    labels: torch.Tensor | None  # int64 (n,), None for unconditional models
    log_prob: torch.Tensor  # float64 (n,): log p of the generated sub-pixels at temperature 1, nats


def resolve_labels(
    config: ModelConfig, n: int, labels: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor | None:
    """The labels to condition on: given ones (checked), drawn ones, or None for an unconditional model."""
    if not config.conditional:
        if labels is not None:
            raise ValueError("this model is unconditional: labels are not accepted")
        return None
    if labels is None:
        return torch.randint(config.num_classes, (n,), generator=generator)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n).clone()
    if labels.numel() != n:
        raise ValueError(f"got {labels.numel()} labels for {n} images")
    if labels.min() < 0 or labels.max() >= config.num_classes:
        raise ValueError(f"labels must be in 0..{config.num_classes - 1}")
    return labels


def row_uniforms(generator: torch.Generator, n: int, channels: int, width: int) -> torch.Tensor:
    """The random numbers for one row of n images: float64 (n, C, W), on the generator's device."""
    return torch.rand((n, channels, width), generator=generator, dtype=torch.float64)


def draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sampling. logits (n, 256), uniforms (n,), temperature float64 (n, 1) or () -> values
    int64 (n,), log p(value) (n,) at T=1. TorchScript-compatible: the cached engine compiles it into its
    row loop, so both samplers run this very function."""
    logits = logits.double()
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(dim=-1).contiguous()
    values = torch.searchsorted(cdf, uniforms.to(cdf.device).reshape(-1, 1).contiguous()).clamp_(max=cdf.shape[-1] - 1)
    log_prob = torch.log_softmax(logits, dim=-1).gather(1, values)
    return values[:, 0], log_prob[:, 0]


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def prepare_canvas(
    config: ModelConfig, n: int, known: torch.Tensor | None, known_rows: int, device: torch.device
) -> torch.Tensor:
    """The image being generated, int64 (n, C, H, W): known rows copied in, the rest zero."""
    canvas = torch.zeros((n, *config.shape), dtype=torch.long, device=device)
    if known is None:
        if known_rows:
            raise ValueError("known_rows needs a known image")
        return canvas
    if tuple(known.shape[1:]) != config.shape or known.shape[0] not in (1, n):
        raise ValueError(f"known image must have shape (1 or {n}, {', '.join(map(str, config.shape))})")
    if not 0 <= known_rows <= config.height:
        raise ValueError(f"known_rows must be in 0..{config.height}, got {known_rows}")
    canvas[:, :, :known_rows] = known[:, :, :known_rows].to(device=device, dtype=torch.long)
    return canvas


def start_sampling(
    config: ModelConfig,
    n: int,
    labels: torch.Tensor | list[int] | None,
    temperature: float,
    seed_or_generator: int | torch.Generator | None,
    known: torch.Tensor | None,
    known_rows: int,
    device: torch.device,
) -> tuple[torch.Generator, torch.Tensor | None, torch.Tensor]:
    """Steps 0 and 1 of the protocol, shared by every sampler: check the arguments, make the generator,
    resolve (or draw) the labels, and lay out the canvas. Returns (generator, labels, canvas)."""
    check_temperature(temperature)
    generator = seed_or_generator
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(generator or 0)
    labels = resolve_labels(config, n, labels, generator)
    return generator, labels, prepare_canvas(config, n, known, known_rows, device)


@torch.no_grad()
def sample_naive(
    model: nn.Module,
    n: int = 1,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    known: torch.Tensor | None = None,
    known_rows: int = 0,
) -> SampleResult:
    """Reference sampler: one full forward pass per sub-pixel (H * W * C passes). Slow and obviously right.

    With `known` (n or 1, C, H, W) and `known_rows` r, rows < r are kept and rows >= r are generated
    conditioned on them (image completion).
    """
    config: ModelConfig = model.config
    device = next(model.parameters()).device
    generator, labels, canvas = start_sampling(config, n, labels, temperature, generator, known, known_rows, device)
    labels_dev = labels.to(device) if labels is not None else None
    log_prob = torch.zeros(n, dtype=torch.float64, device=device)
    temperature_t = torch.tensor(float(temperature), dtype=torch.float64, device=device)
    for i in range(known_rows, config.height):
        u = row_uniforms(generator, n, config.image_channels, config.width)
        for j in range(config.width):
            for c in range(config.image_channels):
                logits = model(canvas, labels_dev)[:, :, c, i, j]  # (n, 256)
                values, lp = draw(logits, u[:, c, j], temperature_t)
                canvas[:, c, i, j] = values
                log_prob += lp
    return SampleResult(canvas.to(torch.uint8).cpu(), labels, log_prob.cpu())
