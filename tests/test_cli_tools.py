"""The CLI's own wiring: `pixelcnn bench` (one verb per benchmark, each described), `pixelcnn card` (a model
card's pictures, drawn from the checkpoint with fixed seeds) and the `pixelcnn train` flags (TrainOptions)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import BENCH_VERBS, add_train, main
from app.engine import sample_cached
from app.imaging import enlarge, grid, save_grid
from app.model import load, save
from app.train_options import TrainOptions, train_options_from
from tests.helpers import tiny_model, torch_threads


def test_bench_help_lists_every_verb_with_its_description(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long descriptions
    for verb, (_, description) in BENCH_VERBS.items():
        assert f"{verb} {description}" in text


@pytest.mark.parametrize("verb,option", [("sampling", "--batches"), ("http", "--url"), ("load", "--clients")])
def test_a_bench_verb_hands_its_arguments_to_its_module(verb: str, option: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pixelcnn bench {verb}") and option in out


def test_unknown_arguments_of_an_ordinary_verb_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "m", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_card_draws_the_seeded_pictures_of_a_small_model(tmp_path, tiny_npz) -> None:
    folder = tmp_path / "m"
    save(tiny_model("gated", 1, size=8, num_classes=3, seed=2).float(), folder)
    history = [{"step": s, "train_bits_per_dim": 6.0 - s / 10, "test_bits_per_dim": 6.1 - s / 10} for s in (5, 10)]
    (folder / "metrics.json").write_text(json.dumps({"dataset": str(tiny_npz), "history": history}))
    args = ["card", str(folder), "--per-class", "2", "--completions", "2", "--seed", "3"]
    with torch_threads(1):
        assert main(args) == 0
        # samples.png: one row per class, each image the cached sampler's with the card's seed
        labels = torch.arange(3).repeat_interleave(2)
        save_grid(sample_cached(load(folder), 6, labels=labels, seed=3).images, tmp_path / "expected.png", 2, 2)
        assert (folder / "samples.png").read_bytes() == (tmp_path / "expected.png").read_bytes()
        # completions.png: per test image, the original, its top half and 4 completions
        completions = (folder / "completions.png").read_bytes()
        assert main(args) == 0
    assert (folder / "completions.png").read_bytes() == completions, "seeded: the same pictures again"
    blank = enlarge(grid(np.zeros((2 * 6, 1, 8, 8), dtype=np.uint8), columns=6), 2)
    assert Image.open(folder / "completions.png").size == (blank.shape[2], blank.shape[1])
    assert Image.open(folder / "curve.png").size == (640, 360)


def train_flags(*argv: str) -> TrainOptions:
    parser = argparse.ArgumentParser()
    add_train(parser.add_subparsers())
    args = parser.parse_args(["train", *argv])
    return train_options_from(args, "pixelcnn train")


def test_train_flags_are_the_train_options_fields() -> None:
    """Defaults come from TrainOptions, and each flag sets its field (a bool flag turns its default around)."""
    assert train_flags("--data", "d", "--out", "o") == TrainOptions(data="d", out=Path("o"), command="pixelcnn train")
    given = train_flags(
        *("--data", "d", "--out", "o", "--epochs", "2.5", "--batch-size", "8", "--ema", "0.99"),
        *("--init-from", "w", "--precision", "bf16", "--no-samples", "--resume", "--final-eval-limit", "7"),
    )
    assert given == TrainOptions(
        data="d",
        out=Path("o"),
        epochs=2.5,
        batch_size=8,
        ema=0.99,
        init_from=Path("w"),
        precision="bf16",
        sample_grid=False,
        resume=True,
        final_eval_limit=7,
        command="pixelcnn train",
    )
    flags = {f.name for f in dataclasses.fields(TrainOptions) if f.metadata.get("cli", True)}
    assert flags == set(TrainOptions.__dataclass_fields__) - {"grad_clip", "command"}
