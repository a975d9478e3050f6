"""Model throughput benchmark: forward (likelihood) and training images/s of gated conditional 28x28 models.

    pixelcnn bench model --sizes 32x7,64x10 --batch-size 64 --steps 5 [--json]

Each size is CHANNELSxLAYERS; the rest is ModelConfig's defaults (gated, 28x28 grayscale, first kernel 7,
later kernels 3) with 10 classes and head_channels = 2 x channels. Inputs are random pixels and labels: speed
does not depend on the values. One untimed warm-up iteration precedes each measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from app.model import ModelConfig, build, nll_nats, nll_per_subpixel

NUM_CLASSES = 10


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """ "32x7,64x10" -> [(32, 7), (64, 10)]."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        channels, sep, layers = item.partition("x")
        if not sep or not channels.isdigit() or not layers.isdigit() or int(channels) < 1 or int(layers) < 1:
            raise argparse.ArgumentTypeError(f"sizes are CHANNELSxLAYERS, e.g. 32x7; got {item!r}")
        sizes.append((int(channels), int(layers)))
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes is empty")
    return sizes


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(config: ModelConfig, batch: int, device: torch.device, generator: torch.Generator):
    images = torch.randint(0, 256, (batch, *config.shape), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, config.num_classes, (batch,), generator=generator)
    return images.to(device), labels.to(device)


def images_per_s(step, batch: int, steps: int, device: torch.device) -> float:
    """Call `step` once to warm up, then `steps` times timed; images per second over the timed calls."""
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / max(time.perf_counter() - start, 1e-9)


def bench_size(channels: int, layers: int, args: argparse.Namespace, device: torch.device) -> dict:
    config = ModelConfig(
        hidden_channels=channels,
        layers=layers,
        kernel_size=args.kernel_size,
        head_channels=2 * channels,
        num_classes=NUM_CLASSES,
        class_names=[str(i) for i in range(NUM_CLASSES)],
    )
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = build(config).to(device)
    params = sum(p.numel() for p in model.parameters())

    model.eval()
    images, labels = random_batch(config, args.forward_batch_size, device, generator)

    def forward() -> None:
        with torch.no_grad():
            nll_nats(model, images, labels)

    forward_rate = images_per_s(forward, args.forward_batch_size, args.steps, device)

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_images, train_labels = random_batch(config, args.batch_size, device, generator)

    def train_step() -> None:
        loss = nll_per_subpixel(model(train_images, train_labels), train_images).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_rate = images_per_s(train_step, args.batch_size, args.steps, device)
    return {
        "model": f"gated {channels}x{layers}",
        "channels": channels,
        "layers": layers,
        "params": params,
        "forward_images_per_s": round(forward_rate, 1),
        "train_images_per_s": round(train_rate, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }


def print_table(rows: list[dict]) -> None:
    header = ("model", "params", "forward img/s", "train img/s")
    lines = [header] + [
        (r["model"], f"{r['params']:,}", f"{r['forward_images_per_s']:.1f}", f"{r['train_images_per_s']:.1f}")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    if rows:
        print(f"torch {rows[0]['torch']}, {rows[0]['threads']} threads, device {rows[0]['device']}")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench model", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("32x7,64x10"),
        help="comma-separated CHANNELSxLAYERS (default 32x7,64x10)",
    )
    parser.add_argument("--kernel-size", type=positive, default=3, help="kernel of the layers after the first")
    parser.add_argument("--batch-size", type=positive, default=64, help="training batch (default 64)")
    parser.add_argument("--forward-batch-size", type=positive, default=256, help="likelihood batch (default 256)")
    parser.add_argument("--steps", type=positive, default=5, help="timed iterations after one warm-up (default 5)")
    parser.add_argument("--threads", type=positive, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="default cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args(argv)

    from app.model import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows = [bench_size(channels, layers, args, device) for channels, layers in args.sizes]
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(run())
