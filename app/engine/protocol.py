"""The sampling protocol, the engine's side: what makes a sampler produce the same images from the same seed.

1. Every image has its own random stream: image k of a request with seed s draws from
   numpy.random.Generator(PCG64(SeedSequence(s, spawn_key=(k,)))), numpy's way of splitting one seed
   into independent streams (the same as SeedSequence(s).spawn(n)[k]). All 63 bits of the seed count.
2. A class-conditional model without given labels draws image k's label first, from its stream: for a
   sample, integers(K) (the uniform prior); for a completion that keeps pixels, from the posterior
   p(y | kept pixels) (posterior.py): the inverse CDF of the K class probabilities at random(), the same
   rule as for pixels in step 3. A completion with label_mode "prior" (or nothing kept) draws as a sample.
3. At the start of every row that is generated, image k draws its uniforms, random((C, W)) in float64.
   Sub-pixel (c, j) of image k is then the inverse CDF of softmax(logits / T) at U[c, j]: the first level
   whose cumulative probability exceeds U times the total (the total is 1 up to rounding; scaling by it
   means a level of probability 0 is never drawn).
   A completion whose kept pixels end mid-row (known_columns pixels of its first generated row are kept)
   draws that row's uniforms as any other; its kept sub-pixels take their known values instead of the
   drawn ones (teacher forcing) and add nothing to log_prob, which counts generated sub-pixels only.
An image's numbers therefore depend only on (seed, k), never on how many images its request has or on
which of them are drawn together: the scheduler may split a request across decode lanes and the images
stay the same, and image k of a request of n is image k of any longer request with the same seed.
Drawing per row (not per pixel) keeps the Python work per decode step to one call per image; drawing in
float64 keeps the CDF comparison away from float32 rounding.

The naive reference sampler (app.model.sampling) implements the same protocol in its own code, so that a
test comparing the two is a test of both.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch

from app.model import ModelConfig

# What the sampling and scoring functions accept: numpy arrays and lists from the server, tensors from the
# library's own callers (the CLI, the tools, the tests).
ImagesIn = torch.Tensor | npt.NDArray[np.uint8]
LabelsIn = torch.Tensor | list[int] | None

# Temperatures outside this range give no useful picture: at 0.05 nearly every draw is already the most
# likely level (the greedy image), and at 20 softmax(logits / T) is close to uniform noise. Inside it,
# logits / T stays far from float64 overflow.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def check_temperature(temperature: float) -> float:
    if not (math.isfinite(temperature) and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise ValueError(f"temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got {temperature}")
    return float(temperature)


def image_streams(seed: int, n: int) -> list[np.random.Generator]:
    """The random streams of images 0 .. n - 1 of a request with this seed (step 1)."""
    return [np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k,))) for k in range(n)]


def check_labels(config: ModelConfig, n: int, labels: LabelsIn) -> torch.Tensor | None:
    """Given labels as int64 (n,) (one label is repeated n times), checked against the model; None if none
    were given. Raises ValueError naming what is wrong."""
    if not config.conditional:
        if labels is not None:
            raise ValueError("this model is unconditional: labels are not accepted")
        return None
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n).clone()
    if labels.numel() != n:
        raise ValueError(f"got {labels.numel()} labels for {n} images")
    if labels.min() < 0 or labels.max() >= config.num_classes:
        raise ValueError(f"labels must be in 0..{config.num_classes - 1}")
    return labels


LABEL_MODES = ("posterior", "prior")  # how a completion without labels draws its class (step 2)


def infers_labels(config: ModelConfig, labels: object, known_pixels: int, label_mode: str) -> bool:
    """Whether step 2 draws the labels from the posterior of the kept pixels (which needs a model pass,
    done where the model runs) instead of from the prior."""
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {label_mode!r}")
    return config.conditional and labels is None and known_pixels > 0 and label_mode == "posterior"


def resolve_labels(config: ModelConfig, labels: LabelsIn, streams: list[np.random.Generator]) -> torch.Tensor | None:
    """The labels to condition on (step 2): given ones (checked), one drawn from each image's stream with the
    prior, or None for an unconditional model."""
    labels = check_labels(config, len(streams), labels)
    if config.conditional and labels is None:
        labels = torch.tensor([int(stream.integers(config.num_classes)) for stream in streams], dtype=torch.long)
    return labels


def draw_labels(streams: list[np.random.Generator], class_log_probs: torch.Tensor) -> torch.Tensor:
    """Step 2 from a posterior: class_log_probs float64 (n, K) -> labels int64 (n,), each the first class
    whose cumulative probability exceeds its image's random() times the total."""
    uniforms = torch.tensor([stream.random() for stream in streams], dtype=torch.float64)
    cdf = class_log_probs.double().exp().cumsum(dim=1)
    labels = (cdf <= uniforms[:, None] * cdf[:, -1:]).sum(dim=1)
    return labels.clamp_(max=class_log_probs.shape[1] - 1)


def row_uniforms(streams: list[np.random.Generator], channels: int, width: int) -> torch.Tensor:
    """The random numbers for one row of these images (step 3): float64 (n, C, W), on the CPU."""
    return torch.from_numpy(np.stack([stream.random((channels, width)) for stream in streams]))


def draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sampling. logits (n, 256), uniforms (n,), temperature float64 (n, 1) or () -> values
    int64 (n,), log p(value) (n,) at T=1. TorchScript-compatible: the cached engine compiles it into its
    row loop."""
    logits = logits.double()
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(dim=-1).contiguous()
    # u in [0, 1) scaled by the CDF's last value (1 up to rounding): the first level whose CDF exceeds it
    # always has probability > 0, also for u = 0 and for u above a CDF total that rounded below 1.
    target = (uniforms.to(cdf.device).reshape(-1, 1) * cdf[:, -1:]).contiguous()
    values = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    log_prob = torch.log_softmax(logits, dim=-1).gather(1, values)
    return values[:, 0], log_prob[:, 0]


def prepare_canvas(
    config: ModelConfig,
    n: int,
    known: ImagesIn | None,
    known_rows: int,
    device: torch.device,
    known_columns: int = 0,
) -> torch.Tensor:
    """The image being generated, int64 (n, C, H, W): known rows copied in, and the first `known_columns`
    pixels of row `known_rows` (kept pixels that end mid-row), the rest zero."""
    canvas = torch.zeros((n, *config.shape), dtype=torch.long, device=device)
    if known is None:
        if known_rows or known_columns:
            raise ValueError("known_rows and known_columns need a known image")
        return canvas
    known = torch.as_tensor(known)
    if tuple(known.shape[1:]) != config.shape or known.shape[0] not in (1, n):
        raise ValueError(f"known image must have shape (1 or {n}, {', '.join(map(str, config.shape))})")
    if not 0 <= known_rows <= config.height:
        raise ValueError(f"known_rows must be in 0..{config.height}, got {known_rows}")
    if known_columns and not (0 < known_columns < config.width and known_rows < config.height):
        raise ValueError(f"known_columns must be in 0..{config.width - 1} and leave a row to draw, got {known_columns}")
    canvas[:, :, :known_rows] = known[:, :, :known_rows].to(device=device, dtype=torch.long)
    if known_columns:
        kept = known[:, :, known_rows, :known_columns]
        canvas[:, :, known_rows, :known_columns] = kept.to(device=device, dtype=torch.long)
    return canvas


def forced_row(canvas: torch.Tensor, row: int, known_columns: int) -> torch.Tensor | None:
    """The sub-pixels of row `row` a sampler must not draw (step 3, kept pixels that end mid-row): int64
    (n, C, W) on the CPU, the kept values in columns < known_columns and -1 (drawn) after them; None
    when no pixel of the row is kept."""
    if not known_columns:
        return None
    forced = torch.full_like(canvas[:, :, row], -1).cpu()
    forced[:, :, :known_columns] = canvas[:, :, row, :known_columns].cpu()
    return forced


def start_sampling(
    config: ModelConfig,
    n: int,
    labels: LabelsIn,
    temperature: float,
    seed: int,
    known: ImagesIn | None,
    known_rows: int,
    device: torch.device,
    label_mode: str = "posterior",
    known_columns: int = 0,
) -> tuple[list[np.random.Generator], torch.Tensor | None, torch.Tensor, bool]:
    """Steps 1 and 2 of the protocol: check the arguments, make each image's stream, resolve (or draw) the
    labels, and lay out the canvas. Returns (streams, labels, canvas, infer): with `infer`, the labels are
    None and must be drawn from the kept pixels' posterior (draw_labels) before anything else is drawn."""
    check_temperature(temperature)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    canvas = prepare_canvas(config, n, known, known_rows, device, known_columns)
    streams = image_streams(seed, n)
    if infers_labels(config, labels, known_rows * config.width + known_columns, label_mode):
        return streams, None, canvas, True
    return streams, resolve_labels(config, labels, streams), canvas, False
