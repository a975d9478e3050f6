"""`pixelcnn eval`: JSON output, agreement of nats and bits/dim, --limit, and the exit-code-2 errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from app.cli import main
from app.data import load_dataset
from app.model import load, nll_nats
from tests.helpers import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def eval_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    """Run `pixelcnn eval ... --json`; stdout must be exactly one JSON object."""
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    summary = json.loads(lines[0])
    assert isinstance(summary, dict)
    return summary


def test_eval_json(trained_model: Path, tiny_npz: Path, capsys: pytest.CaptureFixture) -> None:
    summary = eval_json(capsys, str(trained_model), "--data", str(tiny_npz))
    dims = 1 * 8 * 8
    assert summary["bits_per_dim"] == pytest.approx(summary["nll_nats"] / (dims * math.log(2)), rel=0, abs=1e-9)
    assert summary["images"] == 32 and summary["split"] == "test" and summary["dataset"] == str(tiny_npz)
    assert summary["conditional_on_labels"] is False
    # The same numbers as the final evaluation of training, and as a direct computation.
    metrics = json.loads((trained_model / "metrics.json").read_text())
    assert summary["nll_nats"] == pytest.approx(metrics["test_nll_nats"], abs=1e-3)
    test_set = load_dataset(str(tiny_npz), "test")
    with torch.no_grad():
        direct = nll_nats(load(trained_model), test_set.images).double().mean().item()
    assert summary["nll_nats"] == pytest.approx(direct, rel=1e-6)


def test_eval_defaults_to_training_dataset_and_limit(
    trained_model: Path, tiny_npz: Path, capsys: pytest.CaptureFixture
) -> None:
    summary = eval_json(capsys, str(trained_model), "--limit", "5", "--batch-size", "2")
    assert summary["dataset"] == str(tiny_npz)  # from metrics.json
    assert summary["images"] == 5
    test_set = load_dataset(str(tiny_npz), "test", limit=5)
    with torch.no_grad():
        direct = nll_nats(load(trained_model), test_set.images).double().mean().item()
    assert summary["nll_nats"] == pytest.approx(direct, rel=1e-6)
    train_summary = eval_json(capsys, str(trained_model), "--split", "train", "--limit", "7")
    assert train_summary["split"] == "train" and train_summary["images"] == 7


def test_eval_text_output(trained_model: Path, tiny_npz: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(trained_model), "--data", str(tiny_npz), "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "on 4 " in out


def test_eval_not_a_checkpoint(tmp_path: Path, tiny_npz: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    assert main(["eval", str(folder), "--data", str(tiny_npz), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(folder) in captured.err and "config.json" in captured.err
    assert "Traceback" not in captured.err


def test_eval_missing_weights(
    tmp_path: Path, trained_model: Path, tiny_npz: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "half"
    folder.mkdir()
    shutil.copy(trained_model / "config.json", folder)
    assert main(["eval", str(folder), "--data", str(tiny_npz)]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_eval_without_data_or_metrics(tmp_path: Path, trained_model: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained_model / name, folder)
    assert main(["eval", str(folder), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1
    assert str(folder) in err and "metrics.json" in err and "--data" in err


def test_eval_missing_dataset(trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.npz"
    assert main(["eval", str(trained_model), "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
