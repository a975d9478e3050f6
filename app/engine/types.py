"""The engine's public types: what a caller submits, what it receives, and the errors it can get.

Everything here is what crosses the engine's edge (the server, the CLI and the tools use only these and
the Engine's methods); how a request is split, batched and decoded stays inside the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GenerationRequest:
    n: int = 1
    seed: int = 0
    labels: list[int] | torch.Tensor | None = None  # None: drawn with the seed (class-conditional models)
    temperature: float = 1.0
    known: np.ndarray | torch.Tensor | None = None  # uint8 (1 or n, C, H, W): image to complete
    known_rows: int = 0  # rows of `known` kept; generation starts at this row
    # and the first known_columns pixels of row known_rows (kept pixels that end mid-row): teacher-forced
    known_columns: int = 0
    label_mode: str = "posterior"  # a completion without labels: its class from the kept rows, or "prior"


@dataclass
class RowEvent:
    row: int
    pixels: torch.Tensor  # uint8 (n, C, W)


@dataclass
class SampleResult:
    images: torch.Tensor  # uint8 (n, C, H, W)
    labels: torch.Tensor | None  # int64 (n,), None for unconditional models
    log_prob: torch.Tensor  # float64 (n,): log p of the generated sub-pixels at temperature 1, nats
    # float64 (n, K): log p(y | kept pixels) when the labels were drawn from it (a completion without labels)
    class_log_probs: torch.Tensor | None = None


@dataclass
class LikelihoodResult:
    nll_nats: torch.Tensor  # float64 (N,): -log p(x | label), or -log sum_y p(y) p(x|y) without labels
    per_pixel: torch.Tensor  # float (N, C, H, W) nats, under `labels`
    labels: torch.Tensor | None  # (N,): the class used (given, or the most likely one)
    class_log_probs: torch.Tensor | None  # (N, K): log p(y | x), uniform prior; conditional, no labels given


class EngineStoppedError(RuntimeError):
    """The engine stopped (or was never started) before the request finished."""


class GenerationError(RuntimeError):
    """A prefill or decode step failed; the request can be retried."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound; the caller should retry later."""


class ScoringError(RuntimeError):
    """The forward pass failed (for example out of memory); the request can be retried."""
