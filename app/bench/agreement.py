"""Cached vs naive sampling in the served dtype: how many seeded images come out the same.

    pixelcnn bench agreement MODEL_DIR [--n 64] [--seeds 0,1] [--temperature 1.0] [--json]

The naive sampler needs H * W * C forward passes; this check needs one per batch, and gives the same
answer. It samples with the cached engine, then replays the naive sampler's decisions: the logits the
naive sampler computes at a sub-pixel (a forward pass over a canvas that holds the same earlier
sub-pixels and zeros after them) are the logits there of one forward pass over the finished image (the
later sub-pixels meet only zero weights), so the naive sampler draws the same image exactly when its own
inverse CDF, at the same uniform, gives the cached value at every sub-pixel. The first sub-pixel where
it does not is where the two pictures part. tests/test_cached_sampling.py checks this replay against
real naive runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from app.engine import sample_cached
from app.engine.protocol import image_streams, resolve_labels, row_uniforms
from app.model import load
from app.model.sampling import inverse_cdf


def naive_agreement(model: nn.Module, n: int, seed: int, temperature: float = 1.0) -> dict:
    """Sample n images cached with `seed`; per image, the raster index of the first sub-pixel where the
    naive sampler would draw otherwise (None: the same image)."""
    config = model.config
    c, h, w = config.shape
    cached = sample_cached(model, n, temperature=temperature, seed=seed)
    # The protocol's random numbers, in its order: each image's label first (when drawn), then a block a row.
    streams = image_streams(seed, n)
    resolve_labels(config, None, streams)
    uniforms = torch.stack([row_uniforms(streams, c, w) for _ in range(h)])  # (H, n, C, W)
    device = next(model.parameters()).device
    with torch.no_grad():
        labels = None if cached.labels is None else cached.labels.to(device)
        logits = model(cached.images.to(device).long(), labels).double().cpu()  # (n, 256, C, H, W)
    raster_logits = logits.permute(0, 3, 4, 2, 1).reshape(-1, logits.shape[1])  # (n H W C, 256)
    raster_u = uniforms.permute(1, 0, 3, 2).reshape(-1)  # (H, n, C, W) -> (n, H, W, C)
    naive_values = inverse_cdf(raster_logits, raster_u, temperature).view(n, -1)
    cached_values = cached.images.long().permute(0, 2, 3, 1).reshape(n, -1)
    differs = naive_values != cached_values
    first = [int(row.nonzero()[0]) if row.any() else None for row in differs]
    return {"seed": seed, "n": n, "identical": sum(f is None for f in first), "first_difference": first}


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="model folder (config.json + model.safetensors)")
    parser.add_argument("--n", type=int, default=64, help="images per seed")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # how the server runs
    model = load(args.model_dir)
    runs = [naive_agreement(model, args.n, int(seed), args.temperature) for seed in args.seeds.split(",")]
    total = sum(r["n"] for r in runs)
    same = sum(r["identical"] for r in runs)
    summary = {
        "model": str(args.model_dir),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "images": total,
        "identical": same,
        "runs": runs,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.model_dir} ({summary['dtype']}): {same} of {total} seeded images identical, cached vs naive")
    for r in runs:
        parted = [(i, f) for i, f in enumerate(r["first_difference"]) if f is not None]
        print(
            f"  seed {r['seed']}: {r['identical']}/{r['n']} identical"
            + (f"; differ at (image, first raster sub-pixel) {parted}" if parted else "")
        )
    return 0
