"""The `pixelcnn` command. Each verb imports what it needs, so `pixelcnn --help` stays fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_verb(sub: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    """A verb whose one-line summary is both its line in `pixelcnn --help` and the top of its own --help."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=summary)
    return parser


def add_train(sub: argparse._SubParsersAction) -> None:
    from app.train_options import add_train_options

    p = add_verb(sub, "train", "train a model and write config.json, model.safetensors, metrics.json")
    p.add_argument(
        "--arch",
        choices=["pixelcnn", "gated"],
        default="gated",
        help="masked-convolution PixelCNN or Gated PixelCNN (default)",
    )
    p.add_argument("--channels", type=int, default=32, help="hidden channels")
    p.add_argument("--layers", type=int, default=7, help="gated layers or residual blocks")
    p.add_argument("--kernel-size", type=int, default=3, help="kernel of the layers after the first")
    p.add_argument("--first-kernel-size", type=int, default=7, help="kernel of the first (mask A) layer")
    p.add_argument("--head-channels", type=int, default=None, help="output head width (default 2 x channels)")
    p.add_argument("--conditional", action="store_true", help="class-conditional (needs a labelled dataset)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    add_train_options(p)  # every TrainOptions field, with its default and help
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from app.data import load_dataset
    from app.model import ModelConfig
    from app.train import command_line, train
    from app.train_options import train_options_from

    if args.threads:
        torch.set_num_threads(args.threads)
    probe = load_dataset(args.data, "train", args.data_dir, limit=1)
    num_classes = len(probe.class_names or []) if args.conditional else 0
    if args.conditional and not num_classes:
        print(f"error: --conditional needs class labels and {probe.name} has none", file=sys.stderr)
        return 2
    config = ModelConfig(
        arch=args.arch,
        image_channels=probe.images.shape[1],
        height=probe.images.shape[2],
        width=probe.images.shape[3],
        hidden_channels=args.channels,
        layers=args.layers,
        first_kernel_size=args.first_kernel_size,
        kernel_size=args.kernel_size,
        head_channels=args.head_channels or 2 * args.channels,
        num_classes=num_classes,
        class_names=list(probe.class_names) if num_classes else [],
    )
    options = train_options_from(args, command_line(args.argv))
    train(config, options)
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "eval", "NLL (nats/image) and bits/dim of a trained model on a dataset split")
    p.add_argument(
        "model_dir", type=Path, help="model folder (config.json + model.safetensors), e.g. model_store/fashion-mnist"
    )
    p.add_argument("--data", help="dataset (default: the one in the model's metrics.json)")
    p.add_argument("--data-dir", help="folder of the dataset (see train --data-dir)")
    p.add_argument("--split", choices=["train", "test"], default="test", help="default test")
    p.add_argument("--limit", type=int, help="first N images only")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto (default): cuda if available"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_eval)


def check_model_folder(path: Path | str) -> None:
    """A clear error before any loading: a missing folder, or a folder that holds no model."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model folder {str(folder)!r} does not exist (a model folder holds config.json and model.safetensors, "
            "e.g. model_store/fashion-mnist)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a model folder: it has no config.json")


def check_image_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")


def run_eval(args: argparse.Namespace) -> int:
    from app.data import load_dataset
    from app.evaluate import evaluate
    from app.model import load, pick_device

    check_model_folder(args.model_dir)
    data = args.data
    if data is None:
        metrics_file = args.model_dir / "metrics.json"
        data = json.loads(metrics_file.read_text()).get("dataset") if metrics_file.is_file() else None
        if data is None:
            print(f"error: {args.model_dir} has no metrics.json naming its dataset; pass --data", file=sys.stderr)
            return 2
    model = load(args.model_dir, pick_device(args.device))
    result = evaluate(model, load_dataset(data, args.split, args.data_dir, args.limit), args.batch_size)
    summary = {"model": str(args.model_dir), "dataset": data, "split": args.split, **result.as_dict()}
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{args.model_dir}: {result.nll_nats:.2f} nats/image, {result.bits_per_dim:.4f} bits/dim "
            f"on {result.images} {data} {args.split} images"
        )
    return 0


def add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=1, help="images to generate")
    p.add_argument("--seed", type=int, help="random seed (drawn and printed when absent)")
    p.add_argument("--label", help="class index or name (class-conditional models; drawn when absent)")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="0.05..20; 1 (default) is the model's own distribution"
    )
    p.add_argument("--url", help="use a running server (pixelcnn serve) instead of loading the model here")
    p.add_argument(
        "--api-key",
        default=os.environ.get("PIXELCNN_API_KEY") or None,
        help="with --url: the server's API key, sent as a bearer token (default: $PIXELCNN_API_KEY)",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto (default): cuda if available"
    )
    p.add_argument("--out", type=Path, required=True, help="PNG to write: the image itself, or a grid when n > 1")


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "sample", "generate images with the cached sampler (or --naive, or --url)")
    p.add_argument("model", help="model folder, or with --url the model name on the server (optional)", nargs="?")
    add_generation_options(p)
    p.add_argument("--naive", action="store_true", help="use the reference sampler (same images, much slower)")
    p.set_defaults(run=run_sample)


def add_complete(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "complete", "keep the top rows of an image and sample the rest")
    p.add_argument("model", help="model folder, or with --url the model name on the server")
    p.add_argument("image", type=Path, help="image file of the model's size")
    p.add_argument("--rows", type=int, help="known rows kept from the top (default: half the height)")
    p.add_argument(
        "--label-mode",
        choices=["posterior", "prior"],
        default="posterior",
        help="without --label: draw each class from p(class | kept rows) (default) or uniformly (prior)",
    )
    add_generation_options(p)
    p.add_argument("--naive", action="store_true", help="use the reference sampler (same images, much slower)")
    p.set_defaults(run=run_complete)


def generate_locally(args: argparse.Namespace, n: int, known=None, known_rows: int = 0, label_mode: str = "posterior"):
    import functools
    import secrets

    import torch

    from app.engine import sample_cached
    from app.model import load, pick_device, sample_naive

    model = load(args.model, pick_device(args.device))
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    labels = None
    if args.label is not None:
        labels = torch.tensor([model.config.class_index(args.label)] * n)
    # The naive sampler takes minutes (a full forward pass per sub-pixel): it shows a progress bar.
    sampler = functools.partial(sample_naive, progress=True) if args.naive else sample_cached
    result = sampler(
        model,
        n,
        labels=labels,
        temperature=args.temperature,
        seed=seed,
        known=known,
        known_rows=known_rows,
        label_mode=label_mode,
    )
    names = [model.config.class_name(int(y)) for y in result.labels] if result.labels is not None else []
    beliefs = []
    if result.class_log_probs is not None:
        beliefs = [posterior_summary(model.config.class_names, row.exp().tolist()) for row in result.class_log_probs]
    return result.images, seed, names, beliefs


def posterior_summary(class_names: list[str], probabilities: list[float]) -> str:
    """'Dress 97%, Coat 2%': the likeliest classes given the kept rows (those of 1% or more, at most 3)."""
    ranked = sorted(zip(probabilities, class_names), reverse=True)
    shown = [f"{name} {p:.0%}" for p, name in ranked[:3] if p >= 0.01] or [f"{ranked[0][1]} {ranked[0][0]:.0%}"]
    return ", ".join(shown)


def images_from_response(result: dict):
    """uint8 (n, C, H, W) from a /sample or /complete JSON response."""
    import base64

    import numpy as np

    from app.imaging import decode_image

    c, h, w = result["shape"]
    return np.stack([decode_image(base64.b64decode(item["png"]), c, h, w) for item in result["images"]])


def report(args: argparse.Namespace, images, seed: int, names: list[str], beliefs: list[str]) -> int:
    from app.imaging import picture, png_bytes

    args.out.write_bytes(png_bytes(picture(images)))  # one image as itself, like the API's PNG
    labels = f", labels {names}" if names else ""
    print(f"wrote {args.out}: {len(images)} image(s), seed {seed}{labels}")
    if beliefs and len(set(beliefs)) == 1:
        print(f"the kept rows look like: {beliefs[0]}")
    for index, belief in enumerate(beliefs if len(set(beliefs)) > 1 else []):
        print(f"image {index}: the kept rows look like {belief}")
    return 0


def generate_remotely(args: argparse.Namespace, route: str) -> int:
    """--url: the same request through a running server (route "sample" or "complete")."""
    from app.client import PixelCNNClient

    label = int(args.label) if args.label is not None and args.label.isascii() and args.label.isdigit() else args.label
    common = dict(n=args.n, label=label, temperature=args.temperature, seed=args.seed, model=args.model)
    with PixelCNNClient(args.url, api_key=args.api_key) as client:
        if route == "sample":
            result = client.sample(**common)
        else:
            result = client.complete(args.image, rows=args.rows, label_mode=args.label_mode, **common)
    names = [item["label_name"] for item in result["images"] if item.get("label_name")]
    beliefs = [
        posterior_summary(list(item["class_probabilities"]), list(item["class_probabilities"].values()))
        for item in result["images"]
        if item.get("class_probabilities")
    ]
    return report(args, images_from_response(result), result["seed"], names, beliefs)


def run_sample(args: argparse.Namespace) -> int:
    if args.url:
        return generate_remotely(args, "sample")
    if args.model is None:
        print("error: give a model folder (or --url URL)", file=sys.stderr)
        return 2
    check_model_folder(args.model)
    return report(args, *generate_locally(args, args.n))


def run_complete(args: argparse.Namespace) -> int:
    check_image_file(args.image)
    if args.url:
        return generate_remotely(args, "complete")
    from app.imaging import decode_image
    from app.model import ModelConfig

    check_model_folder(args.model)
    config = ModelConfig.load(Path(args.model) / "config.json")
    known = decode_image(args.image.read_bytes(), *config.shape)[None]
    rows = config.height // 2 if args.rows is None else args.rows
    return report(args, *generate_locally(args, args.n, known=known, known_rows=rows, label_mode=args.label_mode))


# Verbs whose options are parsed by their own module's run(argv) (so that `pixelcnn --help` imports none
# of them): name -> (module, what it does). `pixelcnn bench VERB --help` prints that module's options.
BENCH_VERBS = {
    "model": ("app.bench.model", "forward and training images/s of model sizes"),
    "sampling": ("app.bench.sampling", "naive vs cached sampling vs one forward pass; engine concurrency by lanes"),
    "kernel": ("app.bench.kernel", "the C row kernel vs another version of its source, side by side: time, bytes"),
    "http": ("app.bench.http", "a server: /sample vs /likelihood, concurrent requests, time to the first row"),
    "agreement": ("app.bench.agreement", "cached vs naive images in the served dtype"),
    "quality": ("app.bench.quality", "samples judged by an independent classifier"),
    "load": ("app.bench.load", "load and soak: many clients, mixed routes, for a fixed time"),
    "soak": ("app.bench.soak", "soak behind the gateway: hostile clients, decode faults, a replica killed"),
    "scale": ("app.bench.scale", "1 vs 2 replicas (one core each) behind nginx: images/s, p50/p99"),
    "golden": ("app.bench.golden", "seeded outputs of a real server vs tests/golden (--write regenerates them)"),
    "hostile": ("app.bench.hostile", "/health latency while clients send huge headers or slow-loris heads"),
    "priority": ("app.bench.priority", "high-priority latency while low-priority requests arrive at 2x capacity"),
    "beside": ("app.bench.beside", "single-image /sample latency beside a long /likelihood, by scoring priority"),
}
CARD = ("app.tools.card", "draw a model card's pictures: samples per class, completions, training curve")


def add_forwarded(sub: argparse._SubParsersAction, name: str, module: str, summary: str) -> None:
    """A verb whose arguments (all of them, --help included) go to `module`.run(argv)."""
    p = sub.add_parser(name, help=summary, description=summary, add_help=False)
    p.set_defaults(run=lambda args: run_module(module, args.options), forwards=True)


def run_module(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).run(argv))


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (pixelcnn bench --help lists them)", description="Benchmarks.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB", title="benchmarks")
    for name, (module, summary) in BENCH_VERBS.items():
        add_forwarded(verbs, name, module, summary)


def add_card(sub: argparse._SubParsersAction) -> None:
    add_forwarded(sub, "card", *CARD)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn", description="Train, evaluate and serve PixelCNN models.")
    sub = parser.add_subparsers(dest="command", required=True)
    from app.server.cli import add_serve

    for add in (add_train, add_eval, add_sample, add_complete, add_serve, add_bench, add_card):
        add(sub)
    # A forwarding verb's arguments are all unknown here: they go to its module, whose parser checks them.
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "forwards", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.options = unknown
    args.argv = list(sys.argv[1:] if argv is None else argv)
    import httpx

    from app.client import PixelCNNError

    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, PixelCNNError) as error:  # a dataset's absence is one too
        print(f"error: {error}", file=sys.stderr)
        return 2
    except httpx.TransportError as error:  # --url: no server there, or the connection broke
        print(f"error: could not reach the server: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
