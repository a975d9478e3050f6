"""Single-image /sample latency beside a long /likelihood, the scoring threads below the decode lanes' CPU
priority or not, measured side by side in one process:
`pixelcnn bench beside MODEL_DIR [--nice 0,10] [--images 64] [--rounds 2] [--json]`.

For each nice value (PIXELCNN_SCORING_NICE), in turn, `--rounds` times, an Engine like the server's (one
lane per usable CPU, one torch thread each, the wavefront measured at start):
1. alone: single-image samples one after another, nothing else running: their median latency;
2. beside: a likelihood request of `--images` images (random pixels; without labels on a conditional
   model, so one pass per class per 16 images: the longest request there is) while single-image samples
   run one after another: their median and 90th-percentile latency, how many ran, and the scoring's time;
3. scoring alone: the same request with nothing beside it.
Reported: the medians over the rounds, per nice value.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from pathlib import Path

import torch

from app.engine import Engine, GenerationRequest, set_cpu_threads
from app.model import load
from app.server.settings import usable_cpus

ALONE_SAMPLES = 10


async def one_sample(engine: Engine, seed: int) -> float:
    """Seconds of one single-image sample."""
    started = time.perf_counter()
    await engine.generate(GenerationRequest(n=1, seed=seed))
    return time.perf_counter() - started


async def measure_once(model, nice: int, images: torch.Tensor, lanes: int) -> dict:
    engine = Engine(model, lanes=lanes, wavefront=None, scoring_nice=nice)
    await engine.start()
    try:
        alone = [await one_sample(engine, seed) for seed in range(ALONE_SAMPLES)]
        started = time.perf_counter()
        scoring = asyncio.ensure_future(engine.likelihood(images))
        beside: list[float] = []
        while not scoring.done():  # one after another, at least one
            beside.append(await one_sample(engine, 1000 + len(beside)))
        await scoring
        scoring_beside_s = time.perf_counter() - started
        started = time.perf_counter()
        await engine.likelihood(images)
        scoring_alone_s = time.perf_counter() - started
    finally:
        await engine.stop()
    beside.sort()
    return {
        "sample_alone_s": statistics.median(alone),
        "sample_beside_s": statistics.median(beside),
        "sample_beside_p90_s": beside[math.ceil(0.9 * len(beside)) - 1],  # nearest rank
        "samples_beside": len(beside),
        "scoring_beside_s": scoring_beside_s,
        "scoring_alone_s": scoring_alone_s,
    }


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench beside", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="model folder (config.json + model.safetensors)")
    parser.add_argument("--nice", default="0,10", help="comma-separated scoring nice values (default 0,10)")
    parser.add_argument("--images", type=int, default=64, help="images of the likelihood request (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each nice value once a round (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    nices = [int(value) for value in args.nice.split(",")]
    if args.rounds < 1 or args.images < 1 or any(not 0 <= nice <= 19 for nice in nices):
        parser.error("--rounds and --images must be at least 1, and each --nice in 0 .. 19")
    set_cpu_threads(1)  # the server's default: one torch thread per lane
    model = load(args.model_dir).float().eval()
    config = model.config
    images = torch.randint(
        0, 256, (args.images, *config.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    lanes = max(1, min(8, usable_cpus()))
    runs: dict[int, list[dict]] = {nice: [] for nice in nices}
    for _ in range(args.rounds):
        for nice in nices:
            runs[nice].append(asyncio.run(measure_once(model, nice, images, lanes)))
    results = [
        {"nice": nice, **{key: round(statistics.median(r[key] for r in rows), 4) for key in rows[0]}}
        for nice, rows in runs.items()
    ]
    if args.json:
        print(json.dumps({"model": str(args.model_dir), "images": args.images, "lanes": lanes, "results": results}))
        return 0
    print(
        f"{args.model_dir}: {args.images} images scored beside single-image samples, {lanes} lanes, "
        f"medians of {args.rounds} rounds"
    )
    header = ("nice", "sample alone", "beside: median", "p90", "samples", "scoring beside", "scoring alone")
    print(" | ".join(f"{h:>14s}" for h in header))
    for r in results:
        cells = (
            str(r["nice"]),
            f"{r['sample_alone_s'] * 1e3:.1f} ms",
            f"{r['sample_beside_s'] * 1e3:.1f} ms",
            f"{r['sample_beside_p90_s'] * 1e3:.1f} ms",
            str(int(r["samples_beside"])),
            f"{r['scoring_beside_s']:.2f} s",
            f"{r['scoring_alone_s']:.2f} s",
        )
        print(" | ".join(f"{c:>14s}" for c in cells))
    return 0
