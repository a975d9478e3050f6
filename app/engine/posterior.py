"""The class of a completion, inferred from the pixels it keeps.

A class-conditional model that completes an image without a given label draws each image's class from
the posterior p(y | kept) = p(y) p(kept | y) / sum_y' p(y') p(kept | y') (uniform p(y), as /likelihood
assumes), then the rest of the image given that class. Together that is exact sampling from the
class-marginal model's conditional p(rest | kept); drawing the class from the prior instead (as if nothing
were known) would complete the top of a dress with the bottom of a boot.

p(kept | y) is the model's own likelihood of the kept pixels. In raster order each of them depends only on
earlier ones, all kept, so one teacher-forced pass over the kept rows under each class gives it exactly;
rows below the kept ones never reach a kept pixel's prediction, so they are left out of the pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from app.model import PixelCNNModel

from .protocol import draw_labels


@torch.no_grad()
def kept_log_likelihoods(
    model: PixelCNNModel, canvas: torch.Tensor, known_pixels: int, scored: dict[bytes, torch.Tensor] | None = None
) -> torch.Tensor:
    """log p(kept | y) for every class y: canvas int64 (n, C, H, W) whose first `known_pixels` pixels in
    raster order are kept (all channels of each) -> float64 (n, K), nats.

    Each distinct kept part is scored once, as one batch of K (one copy per class): an image's numbers never
    depend on which other images are scored with it, and n completions of one upload cost one pass.
    `scored` (kept part's bytes -> its (K,) scores) carries them over calls: a request's shards share it."""
    config = model.config
    k, width = config.num_classes, config.width
    rows = -(-known_pixels // width)  # rows holding a kept pixel
    kept = torch.arange(rows * width, device=canvas.device).view(rows, width) < known_pixels  # (rows, W)
    classes = torch.arange(k, device=canvas.device)
    by_content = {} if scored is None else scored
    out = torch.empty((canvas.shape[0], k), dtype=torch.float64)
    for index, image in enumerate(canvas[:, :, :rows]):
        key = image.cpu().numpy().tobytes()
        if key not in by_content:
            x = image.expand(k, *image.shape)  # (K, C, rows, W)
            log_p = torch.log_softmax(model(x, classes).double(), dim=1)  # (K, 256, C, rows, W)
            per_subpixel = log_p.gather(1, x[:, None]).squeeze(1)  # (K, C, rows, W)
            by_content[key] = (per_subpixel * kept).sum(dim=(1, 2, 3)).cpu()
        out[index] = by_content[key]
    return out


def class_posterior(log_likelihoods: torch.Tensor) -> torch.Tensor:
    """log p(kept | y) (n, K) -> log p(y | kept) (n, K) under the uniform prior p(y) = 1 / K."""
    return torch.log_softmax(log_likelihoods - math.log(log_likelihoods.shape[1]), dim=1)


def infer_labels(
    model: PixelCNNModel,
    streams: list[np.random.Generator],
    canvas: torch.Tensor,
    known_rows: int,
    known_columns: int = 0,
    scored: dict[bytes, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 of the protocol for a completion without labels: each image's class drawn from its posterior
    with its own stream. The kept pixels: rows < known_rows and the first known_columns of row known_rows.
    `scored`: see kept_log_likelihoods. Returns (labels int64 (n,), log p(y | kept) float64 (n, K))."""
    known_pixels = known_rows * model.config.width + known_columns
    class_log_probs = class_posterior(kept_log_likelihoods(model, canvas, known_pixels, scored))
    return draw_labels(streams, class_log_probs), class_log_probs
