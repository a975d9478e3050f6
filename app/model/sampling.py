"""The naive reference sampler: one full forward pass per sub-pixel (H * W * C passes).

Slow and obviously right, and written on its own: it shares no code with the cached engine but the model,
so that comparing the two tests both. It follows the protocol documented in app/engine/protocol.py: the
seed is spawned into one numpy stream per image; each image draws its label first (when not given: for a
completion that keeps rows, from p(y | kept rows) by the same inverse-CDF rule at one uniform; otherwise
integers(K)), then per generated row a float64 block of uniforms (C, W), and each sub-pixel is the first
level whose cumulative probability under softmax(logits / T) exceeds its uniform times the total.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import LEVELS, ModelConfig


@dataclass
class Samples:
    """Images drawn by a sampler of this package (the naive reference here, the cached one in app.engine),
    as torch tensors. The serving engine delivers the same fields as numpy arrays (app.engine.SampleResult)."""

    images: torch.Tensor  # uint8 (n, C, H, W)
    labels: torch.Tensor | None  # int64 (n,), None for unconditional models
    log_prob: torch.Tensor  # float64 (n,): log p of the generated sub-pixels at temperature 1, nats
    # float64 (n, K): log p(y | kept pixels) when the labels were drawn from it (a completion without labels)
    class_log_probs: torch.Tensor | None = None


def inverse_cdf(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, 256) logits, (n,) uniforms in [0, 1) -> (n,) levels: how many levels' cumulative probability
    under softmax(logits / T) is at most u times the total. Probabilities through exp of a log-softmax,
    in float64."""
    probabilities = torch.exp(torch.log_softmax(logits.double() / temperature, dim=1))
    cumulative = torch.cumsum(probabilities, dim=1)
    at_most = cumulative <= u.double()[:, None] * cumulative[:, -1:]
    return at_most.sum(dim=1).clamp(max=LEVELS - 1)


@torch.no_grad()
def sample_naive(
    model: nn.Module,
    n: int = 1,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    known: torch.Tensor | None = None,
    known_rows: int = 0,
    label_mode: str = "posterior",
    known_pixels: int | None = None,
) -> Samples:
    """With `known` (n or 1, C, H, W) and `known_rows` r, rows < r are kept and rows >= r are generated
    conditioned on them (image completion); `known_pixels` p instead keeps the first p pixels in raster
    order (all their channels), which may end mid-row: that row's kept sub-pixels keep their values and
    their uniforms go unused. Without labels, a conditional model draws each completion's class from
    p(y | kept pixels) (label_mode "posterior") or uniformly ("prior")."""
    config: ModelConfig = model.config
    device = next(model.parameters()).device
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    streams = [np.random.Generator(np.random.PCG64(child)) for child in np.random.SeedSequence(seed).spawn(n)]
    c, h, w = config.shape
    kept_count = known_rows * w if known_pixels is None else known_pixels
    kept = (torch.arange(h * w) < kept_count).reshape(h, w).to(device)  # (H, W): True where a pixel is kept
    canvas = torch.zeros((n, c, h, w), dtype=torch.long, device=device)
    if known is not None:
        given = torch.as_tensor(known).to(device, torch.long).expand(n, c, h, w)
        canvas = torch.where(kept, given, canvas)
    class_log_probs = None
    if config.conditional and labels is None and kept_count > 0 and label_mode == "posterior":
        class_log_probs = posterior_of_kept_rows(model, canvas, kept)
        labels = torch.stack(
            [
                inverse_cdf(row[None], torch.tensor([stream.random()]), 1.0)[0]
                for row, stream in zip(class_log_probs, streams)
            ]
        )
    elif config.conditional and labels is None:
        labels = torch.tensor([stream.integers(config.num_classes) for stream in streams])
    elif labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).expand(n).clone()
    on_device_labels = None if labels is None else labels.to(device)
    log_prob = torch.zeros(n, dtype=torch.float64)
    for i in range(kept_count // w, h):
        u = torch.tensor(np.array([stream.random((c, w)) for stream in streams]), dtype=torch.float64)
        for j in range(w):
            if kept[i, j]:
                continue
            for colour in range(c):
                logits = model(canvas, on_device_labels)[:, :, colour, i, j].double().cpu()  # (n, 256)
                values = inverse_cdf(logits, u[:, colour, j], temperature)
                canvas[:, colour, i, j] = values.to(device)
                log_prob += torch.log_softmax(logits, dim=1).gather(1, values[:, None])[:, 0]
    return Samples(canvas.to(torch.uint8).cpu(), labels, log_prob, class_log_probs)


def posterior_of_kept_rows(model: nn.Module, canvas: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """log p(y | kept pixels) (n, K), uniform prior, `kept` bool (H, W): the full image scored under each
    class, one image and one class at a time, with only the kept pixels' log-probabilities counted."""
    config: ModelConfig = model.config
    out = torch.empty((canvas.shape[0], config.num_classes), dtype=torch.float64)
    for index in range(canvas.shape[0]):
        image = canvas[index : index + 1]
        for y in range(config.num_classes):
            label = torch.tensor([y], device=image.device)
            log_p = torch.log_softmax(model(image, label).double(), dim=1)[0]  # (256, C, H, W)
            chosen = log_p.gather(0, image.long())[0]  # (C, H, W)
            out[index, y] = chosen[:, kept].sum()
    return torch.log_softmax(out, dim=1)
