"""`pixelcnn sample` / `pixelcnn complete`: locally (cached or --naive: the same picture) and via --url."""

from __future__ import annotations

import pytest
import torch

from app.bench.servers import serve_in_thread
from app.cli import main
from app.imaging import grid, png_bytes
from app.model import load, sample_naive
from app.server import Settings, create_app
from tests.helpers import png_tensor, torch_threads


def test_sample_cached_and_naive_write_the_same_grid(server_store, tmp_path, capsys):
    cached, naive = tmp_path / "cached.png", tmp_path / "naive.png"
    base = ["sample", str(server_store / "cond"), "--n", "3", "--seed", "5", "--label", "sneaker"]
    assert main([*base, "--out", str(cached)]) == 0
    assert main([*base, "--naive", "--out", str(naive)]) == 0
    assert cached.read_bytes() == naive.read_bytes()
    assert "seed 5" in capsys.readouterr().out
    model = load(server_store / "cond")
    expected = sample_naive(model, 3, labels=torch.tensor([1, 1, 1]), seed=5)
    assert torch.equal(png_tensor(cached.read_bytes()), torch.from_numpy(grid(expected.images, columns=3)))


def test_complete_keeps_the_known_rows(server_store, tmp_path):
    image = (torch.arange(64).reshape(1, 8, 8) * 37 % 256).to(torch.uint8)
    source, out = tmp_path / "top.png", tmp_path / "done.png"
    source.write_bytes(png_bytes(image))
    assert (
        main(["complete", str(server_store / "gray"), str(source), "--rows", "5", "--seed", "1", "--out", str(out)])
        == 0
    )
    done = png_tensor(out.read_bytes())
    assert done.shape == image.shape and torch.equal(done[:, :5], image[:, :5])


def test_n_1_writes_exactly_the_image_the_api_returns(server_store, tmp_path):
    """One image is written as itself (no grid border), locally and through --url, the same picture as
    the server's PNG for the same request."""
    import httpx

    known = tmp_path / "known.png"
    known.write_bytes(png_bytes((torch.arange(64).reshape(1, 8, 8) * 53 % 256).to(torch.uint8)))
    app = create_app(Settings(model_store=server_store, model="cond", device="cpu", threads=1))
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url:
        api_sample = httpx.post(
            f"{url}/sample", json={"n": 1, "seed": 4, "label": 2}, headers={"Accept": "image/png"}
        ).content
        with known.open("rb") as file:
            api_complete = httpx.post(
                f"{url}/complete",
                data={"seed": "4", "rows": "3", "label": "2"},
                files={"image": file},
                headers={"Accept": "image/png"},
            ).content
        for where in (["--url", url, "cond"], [str(server_store / "cond")]):
            sample, done = tmp_path / "sample.png", tmp_path / "done.png"
            assert main(["sample", *where, "--n", "1", "--seed", "4", "--label", "2", "--out", str(sample)]) == 0
            assert (
                main(
                    [
                        "complete",
                        *where,
                        str(known),
                        "--n",
                        "1",
                        "--rows",
                        "3",
                        "--seed",
                        "4",
                        "--label",
                        "2",
                        "--out",
                        str(done),
                    ]
                )
                == 0
            )
            assert png_tensor(sample.read_bytes()).shape == (1, 8, 8)
            assert torch.equal(png_tensor(sample.read_bytes()), png_tensor(api_sample)), where
            assert torch.equal(png_tensor(done.read_bytes()), png_tensor(api_complete)), where


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sample", "{store}/gray", "--label", "3"], "unconditional"),
        (["sample", "{store}/cond", "--label", "cat"], "unknown label 'cat'"),
        (["sample", "{store}/nope"], "/nope' does not exist"),
        (["complete", "{store}/gray", "{store}/gray/config.json"], "could not read the image"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(server_store, tmp_path, capsys, argv, message):
    argv = [a.format(store=server_store) for a in argv] + ["--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_sample_and_complete_through_a_server(server_store, tmp_path):
    app = create_app(Settings(model_store=server_store, model="cond", device="cpu", threads=1))
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url:
        remote, local = tmp_path / "remote.png", tmp_path / "local.png"
        assert main(["sample", "--url", url, "--n", "2", "--seed", "9", "--label", "1", "--out", str(remote)]) == 0
        assert (
            main(["sample", str(server_store / "cond"), "--n", "2", "--seed", "9", "--label", "1", "--out", str(local)])
            == 0
        )
        assert torch.equal(png_tensor(remote.read_bytes()), png_tensor(local.read_bytes()))
        done = tmp_path / "done.png"
        assert main(["complete", "--url", url, "cond", str(local), "--rows", "3", "--out", str(done)]) == 2, (
            "the grid is not an 8x8 image: the server must refuse it"
        )
        single = tmp_path / "single.png"
        single.write_bytes(png_bytes(png_tensor(local.read_bytes())[:, 2:10, 2:10]))
        assert main(["complete", "--url", url, "cond", str(single), "--rows", "3", "--out", str(done)]) == 0


def test_through_a_server_that_wants_a_key(server_store, tmp_path, capsys, monkeypatch):
    """--api-key (or $PIXELCNN_API_KEY, as the server's own setting is named) is sent as the bearer token."""
    app = create_app(Settings(model_store=server_store, model="cond", device="cpu", threads=1, api_key="s3cret"))
    out = str(tmp_path / "keyed.png")
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url:
        assert main(["sample", "--url", url, "--seed", "1", "--out", out]) == 2
        assert "401 unauthorized: missing API key" in capsys.readouterr().err
        assert main(["sample", "--url", url, "--seed", "1", "--api-key", "s3cret", "--out", out]) == 0
        monkeypatch.setenv("PIXELCNN_API_KEY", "s3cret")
        assert main(["sample", "--url", url, "--seed", "1", "--out", out]) == 0


def test_unreachable_server_is_one_line(tmp_path, capsys):
    assert main(["sample", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not reach the server") and "Traceback" not in err


def test_unlabelled_completion_says_what_the_kept_rows_look_like(server_store, tmp_path, capsys):
    """Without --label the class comes from the kept rows, locally and through --url: the same picture,
    and the posterior printed; --label-mode prior draws as before (no posterior)."""
    known = tmp_path / "known.png"
    known.write_bytes(png_bytes((torch.arange(64).reshape(1, 8, 8) * 29 % 256).to(torch.uint8)))
    app = create_app(Settings(model_store=server_store, model="cond", device="cpu", threads=1))
    outputs = []
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url:
        for where in (["--url", url, "cond"], [str(server_store / "cond")]):
            out = tmp_path / f"done{len(outputs)}.png"
            argv = ["complete", *where, str(known), "--n", "2", "--rows", "4", "--seed", "7", "--out", str(out)]
            assert main(argv) == 0
            printed = capsys.readouterr().out
            assert "the kept rows look like: " in printed and "%" in printed, printed
            outputs.append(png_tensor(out.read_bytes()))
            assert main([*argv, "--label-mode", "prior"]) == 0
            assert "look like" not in capsys.readouterr().out
    assert torch.equal(outputs[0], outputs[1])
    model = load(server_store / "cond")
    image = png_tensor(known.read_bytes())[None]
    expected = sample_naive(model, 2, seed=7, known=image, known_rows=4)
    assert torch.equal(outputs[0], torch.from_numpy(grid(expected.images, columns=2)))
