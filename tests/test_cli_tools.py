"""The offline tools behind the CLI: `pixelcnn bench` (one verb per benchmark, each described) and
`pixelcnn card` (a model card's pictures, drawn from the checkpoint with fixed seeds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import torch_threads
from PIL import Image

from app.cli import BENCH_VERBS, main
from app.engine import sample_cached
from app.imaging import enlarge, grid, save_grid
from app.model import load, save
from tests.helpers import tiny_model


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
