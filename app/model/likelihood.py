"""Negative log-likelihood of integer images under a model's 256-way softmaxes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def nll_per_subpixel(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """logits (B, 256, C, H, W), x (B, C, H, W) -> NLL in nats per sub-pixel, (B, C, H, W).

    Half-precision logits (bf16 autocast) are scored in float32; float64 models stay in float64."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits, x.long(), reduction="none")


def nll_nats(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """NLL in nats per image, (B,): one teacher-forced forward pass."""
    return nll_per_subpixel(model(x, labels), x).flatten(1).sum(1)


def bits_per_dim(nats: float, dims: int) -> float:
    """Total NLL in nats of an image with `dims` sub-pixels -> bits per sub-pixel (0 for no sub-pixel: a
    completion that keeps every row draws none)."""
    return nats / (dims * math.log(2)) if dims else 0.0


def marginal_nll_nats(per_class: torch.Tensor) -> torch.Tensor:
    """For a class-conditional model, the NLL of each class (B, K) (one teacher-forced pass per class) ->
    -log sum_y p(y) p(x|y) with a uniform prior p(y), (B,)."""
    return -(torch.logsumexp(-per_class, dim=1) - math.log(per_class.shape[1]))
