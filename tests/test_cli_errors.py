"""`pixelcnn` as a new user meets it: clear one-line errors for missing folders and files, and a client path
(`sample`/`complete --url`) that never imports torch, so it sends its request at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.bench.servers import serve_in_thread
from app.cli import main
from app.imaging import png_bytes
from app.server import Settings, create_app
from tests.helpers import png_tensor, torch_threads

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "{missing}"], "model folder '{missing}' does not exist"),
        (["eval", "{tmp}"], "'{tmp}' is not a model folder: it has no config.json"),
        (["sample", "{missing}", "--out", "{tmp}/x.png"], "model folder '{missing}' does not exist"),
        (
            ["complete", "{store}/gray", "{missing}.png", "--out", "{tmp}/x.png"],
            "image file '{missing}.png' does not exist",
        ),
        (
            ["complete", "{missing}", "{tmp}/top.png", "--out", "{tmp}/x.png"],
            "model folder '{missing}' does not exist",
        ),
        (
            ["complete", "--url", "http://127.0.0.1:9", "gray", "{missing}.png", "--out", "{tmp}/x.png"],
            "image file '{missing}.png' does not exist",
        ),
    ],
)
def test_missing_folders_and_files_get_a_one_line_error_naming_them(argv, message, server_store, tmp_path, capsys):
    (tmp_path / "top.png").write_bytes(png_bytes(torch.zeros(1, 8, 8, dtype=torch.uint8)))
    names = {"missing": str(tmp_path / "no-such"), "tmp": str(tmp_path), "store": str(server_store)}
    assert main([part.format(**names) for part in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(**names)}")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_client_path_never_imports_torch(server_store, tmp_path):
    """`pixelcnn sample/complete --url` in a fresh interpreter: the images arrive and torch was never
    imported (importing it cost ~4 s before the request went out, measured)."""
    app = create_app(Settings(model_store=server_store, model="cond", device="cpu", threads=1))
    source = tmp_path / "top.png"
    source.write_bytes(png_bytes((torch.arange(64).reshape(1, 8, 8) * 37 % 256).to(torch.uint8)))
    check = (
        "import sys\nfrom app.cli import main\ncode = main(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url:
        for argv in (
            ["sample", "--url", url, "cond", "--n", "2", "--seed", "3", "--out", str(tmp_path / "s.png")],
            ["complete", "--url", url, "gray", str(source), "--rows", "4", "--out", str(tmp_path / "c.png")],
        ):
            run = subprocess.run([sys.executable, "-c", check, *argv], env=env, capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            assert run.stdout.startswith("wrote ")
    assert png_tensor((tmp_path / "s.png").read_bytes()).shape[0] == 1
    assert torch.equal(png_tensor((tmp_path / "c.png").read_bytes())[:, :4], png_tensor(source.read_bytes())[:, :4])


def test_naive_sampling_shows_a_progress_bar_of_the_pixels_it_draws(server_store, tmp_path, capsys):
    assert main(["sample", str(server_store / "gray"), "--naive", "--seed", "1", "--out", str(tmp_path / "n.png")]) == 0
    err = capsys.readouterr().err
    assert "naive sampling" in err and "64/64" in err  # an 8x8 model: one step per pixel
    kept = tmp_path / "top.png"
    kept.write_bytes(png_bytes(torch.zeros(1, 8, 8, dtype=torch.uint8)))
    argv = [
        "complete",
        str(server_store / "gray"),
        str(kept),
        "--rows",
        "5",
        "--naive",
        "--out",
        str(tmp_path / "c.png"),
    ]
    assert main(argv) == 0
    assert "24/24" in capsys.readouterr().err  # only the 3 generated rows are counted
