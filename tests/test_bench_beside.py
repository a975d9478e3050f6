"""`pixelcnn bench beside`: single-image samples beside a long likelihood request, per scoring priority."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import app.bench.beside as beside
from app.engine import Engine
from app.model import save
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("beside") / "m"
    save(tiny_model("gated", 1, size=6, num_classes=3, seed=5).float(), folder)
    return folder


def test_each_nice_value_gets_its_engine_and_a_row_of_timings(model_dir, monkeypatch, capsys):
    made: list[int] = []

    def recording_engine(*args, **kwargs) -> Engine:
        engine = Engine(*args, **kwargs)
        made.append(engine.scorer.nice)
        return engine

    monkeypatch.setattr(beside, "Engine", recording_engine)
    status = beside.run([str(model_dir), "--nice", "0,7", "--images", "20", "--rounds", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and made == [0, 7, 0, 7]  # alternating, round by round
    assert report["images"] == 20 and [r["nice"] for r in report["results"]] == [0, 7]
    for r in report["results"]:
        assert r["samples_beside"] >= 1 and r["sample_beside_p90_s"] >= r["sample_beside_s"] > 0
        assert min(r["sample_alone_s"], r["scoring_beside_s"], r["scoring_alone_s"]) > 0


@pytest.mark.parametrize("bad", [["--nice", "20"], ["--rounds", "0"], ["--images", "0"]])
def test_bad_arguments_are_refused(model_dir, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        beside.run([str(model_dir), *bad])
    assert exit_info.value.code == 2 and "--nice in 0 .. 19" in capsys.readouterr().err
