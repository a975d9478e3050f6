"""The golden-output contract: a real `pixelcnn serve` of the shipped models answers fixed seeded /sample,
/complete, OpenAI /v1/images/generations and V2 generate requests with exactly the bytes of
tests/golden/seeded-outputs.json (pixels and log_prob bits),
from 1 and 2 lanes, one request at a time and all of a model's at once (other batches). The file is the
same on every x86-64 CPU (README, "Reproducibility across machines"); regenerate it with
`pixelcnn bench golden --write` only in a commit that changes seeded outputs on purpose."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.bench import golden
from app.engine.c_library import NUMERICS_VERSION

GOLDEN = json.loads(golden.DEFAULT_FILE.read_text())["cases"]
pytestmark = pytest.mark.slow  # real servers of the shipped models


@pytest.fixture(scope="module")
def served() -> tuple[list[dict], list[str]]:
    """Every golden case from a 1-lane and a 2-lane server, one at a time and all at once: the first
    run's records and whatever the other runs returned differently."""
    return golden.run_all(golden.DEFAULT_STORE, [1, 2])


def test_the_golden_file_covers_every_generation_front_end_of_every_shipped_model():
    covered = {(case["route"], case["request"]["model"]) for case in GOLDEN}
    models = golden.shipped_models(golden.DEFAULT_STORE)
    routes = ("/sample", "/complete", golden.OPENAI_GENERATIONS, golden.V2_GENERATE)
    assert covered == {(route, model) for route in routes for model in models}
    assert {case["request"]["n"] for case in GOLDEN} >= {1, 2, 4, 8, 16}


def test_seeded_outputs_are_the_golden_bytes(served):
    records, _ = served
    found = golden.differences(GOLDEN, records)
    assert not found, (
        f"{len(found)} of {len(GOLDEN)} golden images differ; first: {found[0][0]}: {found[0][1]}. If this "
        f"change is meant to change seeded outputs, run `{golden.COMMAND}` and say why in the commit."
    )


def test_every_lane_count_and_batch_gives_the_same_bytes(served):
    _, disagreements = served
    assert not disagreements, f"{len(disagreements)} images differ between runs; first: {disagreements[0]}"


def test_a_difference_is_reported_with_the_first_differing_case(served, capsys):
    records, _ = served
    tampered = [dict(record) for record in GOLDEN]
    for index in (20, 50):  # two images of different cases differ; the report names the earlier one
        tampered[index]["log_prob"] = float.hex(float.fromhex(tampered[index]["log_prob"]) * (1 + 2**-50))
    tampered[50]["pixels_sha256"] = "0" * 64
    assert not golden.report("tampered", tampered, records)
    out = capsys.readouterr().out
    assert f"{len(GOLDEN) - 2}/{len(GOLDEN)} images" in out
    assert "(1 images with other pixels)" in out
    assert f"first difference: {golden.record_key(GOLDEN[20])}: log_prob {GOLDEN[20]['log_prob']} != expected" in out
    assert golden.differences(GOLDEN, records[:-1])[-1] == (golden.record_key(GOLDEN[-1]), "missing")


def test_the_documented_command_rewrites_the_file_as_committed(tmp_path):
    """`pixelcnn bench golden --write` (here to a copy, one lane) writes exactly the committed cases; the
    check without --write exits 1 naming the first differing case of a stale file."""
    written = tmp_path / "golden.json"
    command = [sys.executable, "-m", "app.cli", "bench", "golden", "--lanes", "1", "--file", str(written)]
    result = subprocess.run([*command, "--write"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(written.read_text())["cases"] == GOLDEN

    stale = json.loads(written.read_text())
    stale["cases"][3]["pixels_sha256"] = "f" * 64
    written.write_text(json.dumps(stale))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"first difference: {golden.record_key(GOLDEN[3])}: pixels_sha256 " in result.stdout


def test_the_golden_file_says_how_it_was_made():
    document = json.loads(golden.DEFAULT_FILE.read_text())
    assert document["generated_by"] == "pixelcnn bench golden --write"
    assert {case["numerics"] for case in GOLDEN} == {f"c-kernel/{NUMERICS_VERSION}; portable"}
