"""Sampling benchmark: naive vs cached sampling vs one forward pass, and the engine under concurrency.

    pixelcnn bench sampling MODEL_DIR [--batches 1,16,64] [--naive-rows 2] [--lanes 1,2] [--repeats 5] [--json]

For each batch size: naive sampling (a full forward pass per sub-pixel; timed over --naive-rows rows and
extrapolated to the whole image unless --naive-rows covers it), cached sampling of whole images as served
(the C row kernel where it builds), with the TorchScript row decoder, and with the same decoder run
eagerly, and one teacher-forced forward pass over the
same number of images (what /likelihood costs). The ratios that matter: speedup = naive / cached (naive
~ H*W forwards) and cached_over_forward (the ideal is ~1). Cached and forward times are medians of
--repeats runs. With more than one lane in --lanes, batch 1 is drawn as an engine of that many lanes
serves a lone request, by wavefront decoding (app/engine/wavefront.py; gated models), and cached_s and
cached_over_forward are that figure (cached_lanes says so; one_lane_s keeps the single-thread one).

The roofline: multiply-adds per image of the cached path and of the forward pass (from the model's
matrices), the GFLOP/s each achieved, and this core's FP32 peak measured by a short loop built like the
kernel (app/bench/roofline.py), with FMAs as the kernel computes.

Then the engine without HTTP, for each number of decode lanes: one request for one image, against
--concurrency such requests at once, and one request for --big images, which the engine splits across
its lanes (medians of --repeats interleaved runs; the big request's images must be the same bytes for
every lane count, or the benchmark fails).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from app.engine import CachedSampler, Engine, GenerationRequest, sample_cached
from app.engine.wavefront import Wavefront, sample_wavefront
from app.model import load, nll_nats, pick_device, sample_naive

from .roofline import cached_macs, forward_macs, gflops, measured_peak


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_time(fn, repeats: int) -> float:
    return statistics.median(timed(fn) for _ in range(repeats))


def measure(
    model,
    sampler: CachedSampler,
    torchscript: CachedSampler,
    eager: CachedSampler,
    batch: int,
    naive_rows: int,
    seed: int,
    lanes: int = 1,
    repeats: int = 1,
) -> dict:
    config = model.config
    device = sampler.device
    generator = lambda: torch.Generator().manual_seed(seed)  # noqa: E731 - a fresh, identical stream per run
    images = torch.randint(0, 256, (batch, *config.shape), generator=generator(), dtype=torch.uint8).to(device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if config.conditional else None
    with torch.no_grad():
        nll_nats(model, images, labels)  # warm-up
        forward_s = median_time(lambda: nll_nats(model, images, labels), repeats)
    sample_cached(
        model, batch, seed=seed, sampler=sampler, known=images[:1].cpu(), known_rows=config.height - 1
    )  # warm-up
    one_lane_s = median_time(lambda: sample_cached(model, batch, seed=seed, sampler=sampler), repeats)
    cached_s, cached_lanes, sharing = one_lane_s, 1, None
    decoder = Wavefront.for_row_loop(sampler.row_loop)
    threads = 1 if decoder is None else min(lanes, decoder.useful_lanes)
    if batch == 1 and threads > 1:
        # As an engine of `lanes` lanes draws a lone request: by wavefront on as many threads as rows can be in
        # flight, tuned as the engine tunes it at start, the same bytes as one lane.
        assert decoder is not None
        decoder.tune(sampler, threads)
        one = sample_cached(model, 1, seed=seed, sampler=sampler)
        if not torch.equal(sample_wavefront(sampler, 1, seed=seed, lanes=threads, decoder=decoder).images, one.images):
            raise SystemExit("wavefront decoding drew other images than one lane")
        cached_s = median_time(lambda: sample_wavefront(sampler, 1, seed=seed, lanes=threads, decoder=decoder), repeats)
        cached_lanes, sharing = threads, decoder.describe(threads)
    torchscript_s = timed(lambda: sample_cached(model, batch, seed=seed, sampler=torchscript))
    eager_s = timed(lambda: sample_cached(model, batch, seed=seed, sampler=eager))
    rows = min(naive_rows, config.height)
    # Naive cost does not depend on the position, so the last `rows` rows of a completion time it fairly.
    zeros = torch.zeros((1, *config.shape), dtype=torch.uint8)
    naive_part = timed(lambda: sample_naive(model, batch, seed=seed, known=zeros, known_rows=config.height - rows))
    naive_s = naive_part * config.height / rows
    cached_per_image, forward_per_image = cached_macs(sampler), forward_macs(model)
    return {
        "batch": batch,
        "naive_s": round(naive_s, 4),
        "naive_extrapolated": rows < config.height,
        "naive_rows_timed": rows,
        "cached_s": round(cached_s, 4),
        "cached_lanes": cached_lanes,
        "cached_sharing": sharing,
        "one_lane_s": round(one_lane_s, 4),
        "native_kernel": sampler.row_loop.name == "c-kernel",
        "torchscript_s": round(torchscript_s, 4),
        "eager_decoder_s": round(eager_s, 4),
        "speedup": round(naive_s / cached_s, 1),
        "forward_s": round(forward_s, 4),
        "cached_over_forward": round(cached_s / forward_s, 2),
        "one_lane_over_forward": round(one_lane_s / forward_s, 2),
        "torchscript_over_forward": round(torchscript_s / forward_s, 2),
        "cached_images_per_s": round(batch / cached_s, 1),
        "cached_macs_per_image": cached_per_image,
        "forward_macs_per_image": forward_per_image,
        "one_lane_gflops": gflops(cached_per_image, batch, one_lane_s),
        "torchscript_gflops": gflops(cached_per_image, batch, torchscript_s),
        "forward_gflops": gflops(forward_per_image, batch, forward_s),
    }


async def measure_engine(model, lanes: int, concurrency: int, big: int, repeats: int) -> tuple[dict, torch.Tensor]:
    """One n=1 request alone vs `concurrency` of them at once, and one request of `big` images, on an engine
    with `lanes` decode lanes. Returns the timings and the big request's images (seed 0)."""
    engine = Engine(model, max_batch_images=max(64, concurrency, big), lanes=lanes, wavefront=None)  # as served
    await engine.start()
    try:
        await asyncio.gather(*(engine.generate(GenerationRequest(seed=k)) for k in range(concurrency)))  # warm-up
        one, many, whole = [], [], []
        for repeat in range(repeats):
            one.append(await timed_async(engine.generate(GenerationRequest(seed=repeat))))
            burst = asyncio.gather(
                *(engine.generate(GenerationRequest(seed=1000 * (repeat + 1) + k)) for k in range(concurrency))
            )
            many.append(await timed_async(burst))
            started = time.perf_counter()
            big_images = (await engine.generate(GenerationRequest(n=big, seed=0))).images
            whole.append(time.perf_counter() - started)
    finally:
        await engine.stop()
    return {
        "lanes": lanes,
        "concurrency": concurrency,
        "one_s": round(statistics.median(one), 4),
        "concurrent_s": round(statistics.median(many), 4),
        "concurrent_over_one": round(statistics.median(m / o for m, o in zip(many, one)), 2),
        "big_n": big,
        "big_s": round(statistics.median(whole), 4),
    }, big_images


async def timed_async(awaitable) -> float:
    start = time.perf_counter()
    await awaitable
    return time.perf_counter() - start


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench sampling", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="model folder (config.json + model.safetensors)")
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--naive-rows", type=int, default=2, help="rows of naive sampling to time (then extrapolated)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: what each decode lane runs on, and the single-thread forward pass "
        "the ratios compare with)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--lanes", default="1,2", help="comma-separated decode lane counts for the engine part")
    parser.add_argument("--concurrency", type=int, default=16, help="simultaneous n=1 requests in the engine part")
    parser.add_argument("--big", type=int, default=64, help="images of the one big request in the engine part")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the engine part (medians are shown)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    model = load(args.model_dir, pick_device(args.device))
    sampler, eager = CachedSampler(model), CachedSampler(model, compiled=False)
    torchscript = CachedSampler(model, native=False)  # what runs without the C kernel
    lane_counts = [int(lanes) for lanes in args.lanes.split(",")]
    results = [
        measure(model, sampler, torchscript, eager, int(b), args.naive_rows, args.seed, max(lane_counts), args.repeats)
        for b in args.batches.split(",")
    ]
    peak = measured_peak() if sampler.device.type == "cpu" else None
    if peak is not None:
        for r in results:
            r["one_lane_of_fma_peak"] = round(r["one_lane_gflops"] / peak["fma_gflops"], 2)
            r["forward_of_fma_peak"] = round(r["forward_gflops"] / peak["fma_gflops"], 2)
    engine, big_images = [], []
    for lanes in lane_counts:
        timings, images = asyncio.run(measure_engine(model, lanes, args.concurrency, args.big, args.repeats))
        engine.append(timings)
        big_images.append(images)
    if not all(np.array_equal(images, big_images[0]) for images in big_images):
        raise SystemExit(f"the request for {args.big} images gave different images with different lane counts")
    for r in engine:
        r["big_speedup"] = round(engine[0]["big_s"] / r["big_s"], 2)
    if args.json:
        print(json.dumps({"sampling": results, "peak": peak, "engine": engine}))
        return 0
    c = model.config
    print(
        f"{args.model_dir}: {c.arch}, {c.hidden_channels} channels x {c.layers} layers, image {c.shape}, "
        f"{sampler.device}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'batch':>5} {'naive s':>10} {'cached s':>9} {'torchscript s':>14} {'eager s':>8} {'speedup':>8} "
        f"{'forward s':>10} {'cached/forward':>15} {'torchscript/forward':>20}"
    )
    for r in results:
        mark = "*" if r["naive_extrapolated"] else " "
        print(
            f"{r['batch']:>5} {r['naive_s']:>9.2f}{mark} {r['cached_s']:>9.3f} {r['torchscript_s']:>14.3f} "
            f"{r['eager_decoder_s']:>8.3f} {r['speedup']:>7.0f}x {r['forward_s']:>10.3f} "
            f"{r['cached_over_forward']:>15.2f} {r['torchscript_over_forward']:>20.2f}"
        )
    if any(r["naive_extrapolated"] for r in results):
        print(f"* naive time extrapolated from {results[0]['naive_rows_timed']} timed rows to {c.height}")
    if any(r["cached_lanes"] > 1 for r in results):
        print(
            f"batch 1 cached s: wavefront decoding on {results[0]['cached_lanes']} threads "
            f"({results[0]['cached_sharing']}); on one: {results[0]['one_lane_s']:.3f} s"
        )
    print(
        f"\nroofline: multiply-adds per image, cached {results[0]['cached_macs_per_image'] / 1e6:.0f}M, forward "
        f"{results[0]['forward_macs_per_image'] / 1e6:.0f}M; "
        + (
            f"this core's FP32 peak {peak['fma_gflops']} GFLOP/s with FMAs (as the kernel computes)"
            if peak
            else "no peak measured (no C compiler or not a CPU)"
        )
    )
    print(f"{'batch':>5} {'one lane GFLOP/s':>17} {'of FMA peak':>12} {'forward GFLOP/s':>16} {'of FMA peak':>12}")
    for r in results:
        print(
            f"{r['batch']:>5} {r['one_lane_gflops']:>17.1f} {r.get('one_lane_of_fma_peak', float('nan')):>12.2f} "
            f"{r['forward_gflops']:>16.1f} {r.get('forward_of_fma_peak', float('nan')):>12.2f}"
        )
    kernel = "the C row kernel" if sampler.row_loop.name == "c-kernel" else "TorchScript (the C kernel did not build)"
    print(
        f"cached s: as served ({kernel}); torchscript s: the TorchScript row decoder; eager s: the same "
        "decoder run as plain Python"
    )
    print(
        f"\nengine, no HTTP: {args.concurrency} concurrent requests for 1 image vs one, and one request for "
        f"{args.big} images (medians of {args.repeats}; its images were the same bytes for every lane count)"
    )
    print(
        f"{'lanes':>5} {'one s':>8} {'concurrent s':>13} {'concurrent/one':>15} {f'n={args.big} s':>9} "
        f"{'n=' + str(args.big) + ' speedup':>14}"
    )
    for r in engine:
        print(
            f"{r['lanes']:>5} {r['one_s']:>8.3f} {r['concurrent_s']:>13.3f} {r['concurrent_over_one']:>15.2f} "
            f"{r['big_s']:>9.3f} {r['big_speedup']:>13.2f}x"
        )
    return 0
