"""The C row kernel against another version of its source, side by side in one process:
`pixelcnn bench kernel MODEL_DIR --against REV_OR_FILE [--batches 1,16,64] [--rounds 8] [--json]`.

A machine shared with other tenants drifts by 10% from one minute to the next (BENCHMARKS.md), more than
most kernel changes are worth, so two benchmark runs one after the other cannot tell such a change from
the drift. Here both kernels are loaded in one process, and every round samples each batch once with each,
alternating which goes first, on one torch thread (one lane's cached sampling, as `bench sampling` times
it). Reported per batch: each side's median seconds and GFLOP/s (this side's also as a fraction of the
core's FMA peak, roofline.py), the median of the rounds' own ratios (this source's time over the other's),
and whether every round gave the same images and log p, bytes for
bytes: a change to the kernel must keep them (README, "Reproducibility across machines"), or bump
c_library.NUMERICS_VERSION. Exits with 1 when they differ.

--against is a file, or a git revision whose app/engine/native/row_kernels.c is taken (`git show`); it
must have this version's entry points and structs (what c_library and c_kernel call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app.engine import CachedSampler, c_library, sample_cached
from app.engine.row_loops import CKernelRows
from app.model import load

from .roofline import cached_macs, gflops, measured_peak

KERNEL_PATH = "app/engine/native/row_kernels.c"  # in the repository


def other_source(against: str, folder: Path) -> Path:
    """The other version's source: the file `against`, or the kernel at git revision `against`, written
    into `folder` (named after the revision: the build cache keys on the contents anyway)."""
    if Path(against).is_file():
        return Path(against)
    repository = c_library.SOURCE.parents[3]
    try:
        text = subprocess.run(
            ["git", "-C", str(repository), "show", f"{against}:{KERNEL_PATH}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except FileNotFoundError:
        raise SystemExit(f"--against {against!r} is not a file, and git is not installed to read a revision") from None
    except subprocess.CalledProcessError as error:
        raise SystemExit(
            f"--against {against!r} is neither a file nor a git revision with {KERNEL_PATH}: {error.stderr.strip()}"
        ) from None
    source = folder / f"row_kernels_{''.join(c if c.isalnum() else '_' for c in against)}.c"
    source.write_text(text)
    return source


def compare(model, samplers: list[CachedSampler], batch: int, rounds: int) -> dict:
    """`rounds` rounds of sampling `batch` images with each sampler, alternating which goes first."""
    seconds: list[list[float]] = [[], []]
    same_bytes = True
    for r in range(rounds):
        results = [None, None]
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            started = time.perf_counter()
            results[side] = sample_cached(model, batch, seed=r, sampler=samplers[side])
            seconds[side].append(time.perf_counter() - started)
        this, other = results
        same_bytes &= np.array_equal(this.images.numpy(), other.images.numpy()) and np.array_equal(
            this.log_prob.numpy(), other.log_prob.numpy()
        )
    macs = cached_macs(samplers[0])
    this_s, other_s = (statistics.median(s) for s in seconds)
    return {
        "batch": batch,
        "rounds": rounds,
        "this_s": round(this_s, 4),
        "other_s": round(other_s, 4),
        "this_gflops": round(gflops(macs, batch, this_s), 1),
        "other_gflops": round(gflops(macs, batch, other_s), 1),
        "this_over_other": round(statistics.median(a / b for a, b in zip(*seconds)), 3),
        "same_bytes": bool(same_bytes),
    }


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench kernel", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="model folder (config.json + model.safetensors)")
    parser.add_argument(
        "--against", required=True, help="the other kernel: a C file, or a git revision of this repository"
    )
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes (default 1,16,64)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per batch, each side once a round (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(1)
    model = load(args.model_dir).float()
    this = CachedSampler(model)
    if not isinstance(this.row_loop, CKernelRows):
        raise SystemExit("the C kernel is not running here (no compiler, or PIXELCNN_NATIVE_KERNEL=0)")
    with tempfile.TemporaryDirectory() as folder:
        source = other_source(args.against, Path(folder))
        try:
            library = c_library.load_kernel_source(source)
        except (OSError, RuntimeError, AttributeError) as error:
            raise SystemExit(f"the other kernel ({args.against}) could not be built or loaded: {error}") from None
    other = CachedSampler(model)
    other.row_loop = CKernelRows(other.impl, library, other.device)
    results = [compare(model, [this, other], int(b), args.rounds) for b in args.batches.split(",")]
    peak = measured_peak()  # this core's FP32 FMA peak (roofline.py), measured right after
    for r in results:
        r["this_of_fma_peak"] = round(r["this_gflops"] / peak["fma_gflops"], 3) if peak else None
    same_bytes = all(r["same_bytes"] for r in results)
    if args.json:
        print(json.dumps({"against": args.against, "peak": peak, "results": results}))
        return 0 if same_bytes else 1
    print(f"{args.model_dir}: this kernel ({c_library.SOURCE}) vs {args.against}, {args.rounds} rounds, 1 thread")
    print(
        f"{'batch':>5} {'this s':>8} {'other s':>8} {'this/other':>11} {'this GFLOP/s':>13} {'other':>7} "
        f"{'this of FMA peak':>17} {'same bytes':>11}"
    )
    for r in results:
        of_peak = "" if r["this_of_fma_peak"] is None else f"{r['this_of_fma_peak']:.2f}"
        print(
            f"{r['batch']:>5} {r['this_s']:>8.4f} {r['other_s']:>8.4f} {r['this_over_other']:>11.3f} "
            f"{r['this_gflops']:>13.1f} {r['other_gflops']:>7.1f} {of_peak:>17} {'yes' if r['same_bytes'] else 'NO':>11}"
        )
    if peak:
        print(f"this core's FMA peak, measured after: {peak['fma_gflops']} GFLOP/s")
    print("this/other: the median of the rounds' own ratios (each round ran both, alternating which went first)")
    return 0 if same_bytes else 1
