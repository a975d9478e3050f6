"""Encoding results: JSON bodies, PNG files and grids, Server-Sent Events, likelihood heat maps.

Content negotiation: `"stream": true` or `Accept: text/event-stream` -> SSE; `Accept: image/png` -> the PNG
(a grid when n > 1); anything else (`application/json`, `*/*`, no header) -> JSON.

`scale` (the request field) enlarges every PNG a response carries, the PNG body and the base64 PNGs of
JSON bodies alike, by whole pixels (nearest neighbour); rows of a stream are pixel values, not PNGs.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from app.engine.types import LikelihoodResult, SampleResult
from app.imaging import enlarge, picture, png_bytes
from app.model.likelihood import bits_per_dim

from .registry import ServedModel

Format = Literal["json", "png", "sse"]
_MEDIA: dict[str, Format] = {
    "application/json": "json",
    "image/png": "png",
    "text/event-stream": "sse",
    "application/*": "json",
    "image/*": "png",
    "*/*": "json",
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def choose_format(accept: str | None, stream: bool) -> Format:
    """The response format: highest q in Accept among the ones served (exact types beat wildcards)."""
    if stream:
        return "sse"
    best: tuple[float, int, int] | None = None
    choice: Format = "json"
    for position, item in enumerate((accept or "").split(",")):
        media, _, params = item.strip().partition(";")
        kind = _MEDIA.get(media.strip().lower())
        if kind is None:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        rank = (q, 0 if "*" in media else 1, -position)
        if best is None or rank > best:
            best, choice = rank, kind
    return choice


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_b64(image: npt.NDArray[np.uint8], scale: int) -> str:
    return b64(png_bytes(enlarge(image, scale)))


def generation_body(
    model: ServedModel,
    result: SampleResult,
    seed: int,
    temperature: float,
    elapsed_s: float,
    known_rows: int | None = None,
    scale: int = 1,
    known_columns: int = 0,
) -> dict[str, Any]:
    """The JSON response of /sample and /complete (also the `done` event of a stream).

    bits_per_dim counts only the generated sub-pixels: the kept pixels of a completion (known rows, and
    known_columns pixels of the next row) are given, not drawn.
    """
    c, h, w = model.config.shape
    known_pixels = (known_rows or 0) * w + known_columns
    generated_dims = c * (h * w - known_pixels)
    log_prob = [float(v) for v in np.asarray(result.log_prob)]
    labels = np.asarray(result.labels).tolist() if result.labels is not None else [None] * len(log_prob)
    images = [
        {"png": png_b64(image, scale), "label": label, "label_name": model.class_name(label), "log_prob": lp}
        for image, label, lp in zip(np.asarray(result.images), labels, log_prob)
    ]
    if result.class_log_probs is not None:  # a completion's classes, drawn from p(y | kept rows)
        for image, log_probs in zip(images, np.asarray(result.class_log_probs, dtype=np.float64)):
            image["class_probabilities"] = {model.class_name(k): float(p) for k, p in enumerate(np.exp(log_probs))}
    body = {
        "model": model.name,
        "seed": seed,
        "shape": [c, h, w],
        "images": images,
        "log_prob": log_prob,
        "bits_per_dim": [bits_per_dim(-lp, generated_dims) for lp in log_prob],
        "rows": h,
        "temperature": temperature,
        "elapsed_s": round(elapsed_s, 4),
        "numerics": model.numerics,
    }
    if known_rows is not None:
        body["known_rows"] = known_rows
        body["known_pixels"] = known_pixels
    return body


def generation_png(result: Any, scale: int = 1) -> bytes:
    return png_bytes(enlarge(picture(result.images), scale))


def generation_headers(model: ServedModel, result: Any, seed: int) -> dict[str, str]:
    headers = {"X-Model": model.name, "X-Seed": str(seed), "X-Numerics": model.numerics}
    if result.labels is not None:
        headers["X-Labels"] = ",".join(str(v) for v in result.labels.tolist())
    return headers


def sse_event(event: str, data: Any) -> str:
    """One Server-Sent Event; compact JSON keeps every event on one `data:` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def row_data(row: int, pixels: npt.NDArray[np.uint8]) -> dict[str, Any]:
    return {"row": row, "pixels": np.asarray(pixels).tolist()}


def likelihood_body(model: ServedModel, result: LikelihoodResult, per_pixel: bool, scale: int = 1) -> dict[str, Any]:
    """The JSON response of /likelihood from the engine's LikelihoodResult."""
    config = model.config
    nll = np.asarray(result.nll_nats).tolist()
    labels = np.asarray(result.labels).tolist() if result.labels is not None else [None] * len(nll)
    results = []
    for i, (nats, label) in enumerate(zip(nll, labels)):
        entry: dict[str, Any] = {
            "nll_nats": float(nats),
            "bits_per_dim": bits_per_dim(float(nats), config.dims),
            "label": label,
            "label_name": model.class_name(label),
        }
        if result.class_log_probs is not None:
            probs = np.exp(np.asarray(result.class_log_probs[i], dtype=np.float64)).tolist()  # log p(y|x)
            entry["class_probabilities"] = {model.class_name(k): p for k, p in enumerate(probs)}
        if per_pixel:
            nats_map = np.asarray(result.per_pixel[i], dtype=np.float64)
            values = nats_map[0] if config.image_channels == 1 else nats_map
            entry["per_pixel_nll"] = np.round(values, 5).tolist()  # 5 decimals: plenty, and short
            entry["heatmap_png"] = png_b64(heatmap(nats_map), scale)
        results.append(entry)
    return {"model": model.name, "results": results}


def heatmap(per_pixel: np.ndarray) -> np.ndarray:
    """Per-pixel NLL (C, H, W), summed over colours, as an RGB uint8 (3, H, W) image in a "hot" map: black
    at 0 nats, then red, yellow and white at the image's largest value. Normalised per image: it shows
    where the model is surprised, not how much (per_pixel_nll has the numbers)."""
    heat = np.asarray(per_pixel, dtype=np.float64).sum(0)
    peak = float(heat.max()) if heat.size else 0.0
    t = np.clip(heat / peak, 0, 1) if peak > 0 else np.zeros_like(heat)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)])
    return np.round(rgb * 255).astype(np.uint8)
