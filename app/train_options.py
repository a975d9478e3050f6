"""What a training run is told: TrainOptions, and the `pixelcnn train` flags derived from its fields.

One source: each field's default and help text are the flag's, so a new option is one line here. Kept
free of torch so that building the CLI's parser (and `pixelcnn --help`) stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path


def option(default: typing.Any, help: str, **flag: typing.Any) -> typing.Any:
    """A field with its `pixelcnn train` flag: `help`, plus argparse settings (choices, flag, action)."""
    return field(default=default, metadata={"help": help, **flag})


NOT_A_FLAG = {"cli": False}


@dataclass
class TrainOptions:
    data: str = field(metadata={"help": "fashion-mnist, mnist, cifar10, folder, an image folder or a .npz"})
    out: Path = field(metadata={"help": "model folder to write, e.g. model_store/NAME"})
    data_dir: str | None = option(None, "folder of the dataset (required for mnist, cifar10, folder)")
    epochs: float = option(1.0, "may be fractional")
    batch_size: int = option(64, "global batch (split across torchrun processes)")
    lr: float = option(3e-3, "peak Adam learning rate (cosine decay to 0)")
    # capped at a tenth of the run, so short runs reach the peak rate
    warmup_steps: int = option(200, "learning-rate warmup steps (at most a tenth of the run)")
    grad_clip: float = field(default=1.0, metadata=NOT_A_FLAG)
    limit: int | None = option(None, "train on the first N training images only")
    eval_every: int = option(500, "steps between quick test evaluations")
    eval_limit: int = option(1000, "test images in each quick evaluation")
    final_eval_limit: int | None = option(None, "test images in the final evaluation (default: all)")
    checkpoint_every: float = option(120.0, "seconds between checkpoints")
    checkpoint_dir: Path | None = option(None, "default ~/.cache/pixelcnn/checkpoints/NAME")
    resume: bool = option(False, "continue from the last checkpoint, if any")
    # a model folder whose weights start a fresh run (new optimizer, new schedule)
    init_from: Path | None = option(None, "start from this model folder's weights (fresh optimizer)")
    precision: str = option(
        "auto",
        "bf16 autocast (auto: on CUDA only; bf16 on CPU is fast where it has AMX)",
        choices=["auto", "float32", "bf16"],
    )
    ema: float = option(
        0.0,
        "keep an exponential moving average of the weights with this decay (e.g. 0.9995) and "
        "evaluate and save it instead of the last step's weights (default 0: off)",
    )
    seed: int = option(0, "random seed of the run")
    device: str = option("auto", "where to train", choices=["auto", "cpu", "cuda"])
    sample_grid: bool = option(True, "skip the sample grid at the end", flag="--no-samples")
    command: str = field(default="", metadata=NOT_A_FLAG)  # the command line, recorded in metrics.json


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """A flag per TrainOptions field: --name-with-dashes, its type, default and help (a bool is a switch
    that turns its default around)."""
    hints = typing.get_type_hints(TrainOptions)
    for f in dataclasses.fields(TrainOptions):
        settings = dict(f.metadata)
        if not settings.pop("cli", True):
            continue
        flag = settings.pop("flag", "--" + f.name.replace("_", "-"))
        kind = hints[f.name]
        if kind is bool:
            settings["action"] = "store_false" if f.default else "store_true"
        else:
            settings["type"] = (
                next(t for t in typing.get_args(kind) if t is not type(None)) if typing.get_args(kind) else kind
            )
        if f.default is dataclasses.MISSING:
            settings["required"] = True
        else:
            settings["default"] = f.default
        parser.add_argument(flag, dest=f.name, **settings)


def train_options_from(args: argparse.Namespace, command: str) -> TrainOptions:
    """TrainOptions from the flags add_train_options added."""
    names = [f.name for f in dataclasses.fields(TrainOptions) if f.metadata.get("cli", True)]
    return TrainOptions(**{name: getattr(args, name) for name in names}, command=command)
