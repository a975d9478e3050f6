"""`pixelcnn card MODEL_DIR`: the model card's pictures (sample grid, completions, training curve).

Everything is drawn from the checkpoint with fixed seeds, so anyone can regenerate the card's images and
check them against the weights. The README.md text itself is written by hand around these files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from app.data import load_dataset
from app.engine import sample_cached
from app.imaging import save_grid
from app.model import load


def sample_grid(model, path: Path, per_class: int, seed: int) -> None:
    """One row per class (or a single block for unconditional models)."""
    config = model.config
    classes = config.num_classes if config.conditional else 1
    labels = torch.arange(classes).repeat_interleave(per_class) if config.conditional else None
    result = sample_cached(model, classes * per_class, labels=labels, seed=seed)
    save_grid(result.images, path, columns=per_class, scale=2)


def completion_grid(model, path: Path, dataset: str, count: int, samples: int, seed: int) -> None:
    """Each row: the original test image, its top half, then `samples` completions of the lower half."""
    config = model.config
    test = load_dataset(dataset, "test", limit=count)
    rows = config.height // 2
    tiles = []
    for k in range(count):
        image = test.images[k : k + 1]
        labels = test.labels[k : k + 1].expand(samples) if config.conditional else None
        result = sample_cached(
            model,
            samples,
            labels=labels,
            known=image,
            known_rows=rows,
            seed=seed + k,
        )
        top = image.clone()
        top[:, :, rows:] = 0
        tiles.extend([image, top, result.images])
    save_grid(torch.cat(tiles), path, columns=samples + 2, scale=2)


def curve(history: list[dict], path: Path, width: int = 640, height: int = 360) -> None:
    """Train (grey) and test (blue) bits/dim against training step, with the axes labelled."""
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    steps = [h["step"] for h in history]
    values = [v for h in history for v in (h["train_bits_per_dim"], h["test_bits_per_dim"])]
    lo, hi = min(values) - 0.05, min(max(values), 8.0) + 0.05
    x_max = max(steps)

    def xy(step: float, value: float) -> tuple[float, float]:
        value = min(value, hi)
        return left + (right - left) * step / x_max, bottom - (bottom - top) * (value - lo) / (hi - lo)

    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(5):
        value = lo + (hi - lo) * k / 4
        y = xy(0, value)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((5, y - 6), f"{value:.2f}", fill="black")
    for k in range(5):
        step = x_max * k / 4
        x = xy(step, lo)[0]
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 12, bottom + 8), f"{step:.0f}", fill="black")
    draw.text((left + 5, bottom + 22), "training step", fill="black")
    for key, colour in (("train_bits_per_dim", (150, 150, 150)), ("test_bits_per_dim", (30, 90, 200))):
        points = [xy(h["step"], h[key]) for h in history]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    draw.text((right - 230, top + 5), "bits/dim: train (grey), test (blue)", fill="black")
    picture.save(path)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn card", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--per-class", type=int, default=10, help="samples per class in the grid")
    parser.add_argument("--completions", type=int, default=6, help="test images to complete")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = load(args.model_dir)
    metrics = json.loads((args.model_dir / "metrics.json").read_text())
    sample_grid(model, args.model_dir / "samples.png", args.per_class, args.seed)
    completion_grid(model, args.model_dir / "completions.png", metrics["dataset"], args.completions, 4, args.seed)
    if metrics.get("history"):
        curve(metrics["history"], args.model_dir / "curve.png")
    print(f"wrote samples.png, completions.png, curve.png in {args.model_dir}")
    return 0
