"""`pixelcnn bench kernel`: this kernel against another version of its source, in one process, with a
verdict on the bytes that can fail."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from app.bench.kernel import run
from app.engine import c_library
from app.model import save
from tests.helpers import tiny_model

pytestmark = pytest.mark.skipif(c_library._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("kernel") / "m"
    save(tiny_model("gated", 1, size=6, num_classes=3, seed=5).float(), folder)
    return folder


def bench(model_dir: Path, against: str, capsys: pytest.CaptureFixture) -> tuple[int, dict]:
    status = run([str(model_dir), "--against", against, "--batches", "1,3", "--rounds", "2", "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_the_same_source_gives_the_same_bytes(model_dir, tmp_path, capsys):
    copy = tmp_path / "copy.c"
    shutil.copy(c_library.SOURCE, copy)
    status, report = bench(model_dir, str(copy), capsys)
    assert status == 0 and report["against"] == str(copy)
    assert [r["batch"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert r["same_bytes"] and r["rounds"] == 2
        assert min(r["this_s"], r["other_s"], r["this_gflops"], r["other_gflops"], r["this_over_other"]) > 0
        assert r["this_of_fma_peak"] == pytest.approx(r["this_gflops"] / report["peak"]["fma_gflops"], abs=1e-3)


def test_a_kernel_that_changes_a_number_is_caught(model_dir, tmp_path, capsys):
    source = c_library.SOURCE.read_text()
    assert "/ 127.5f - 1.0f" in source
    planted = tmp_path / "planted.c"  # the drawn pixels fed back scaled by 1/127 instead of 1/127.5
    planted.write_text(source.replace("/ 127.5f - 1.0f", "/ 127.0f - 1.0f"))
    status, report = bench(model_dir, str(planted), capsys)
    assert status == 1 and not any(r["same_bytes"] for r in report["results"])


def test_a_git_revision_is_read_from_the_repository(model_dir, capsys):
    repository = c_library.SOURCE.parents[3]
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(repository), "rev-parse", "HEAD"]).returncode:
        pytest.skip("not a git checkout with git installed")
    status, report = bench(model_dir, "HEAD", capsys)
    assert status in (0, 1) and report["against"] == "HEAD" and len(report["results"]) == 2


def test_an_unknown_revision_is_named(model_dir):
    said = "'no-such-revision' is (neither a file nor a git revision|not a file, and git is not installed)"
    with pytest.raises(SystemExit, match=said):
        run([str(model_dir), "--against", "no-such-revision"])
