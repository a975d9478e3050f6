"""app.client against a real uvicorn server on a free port (a thread of this process), the SSE parser,
the PNG helpers, `pixelcnn serve` argument handling and the HTTP benchmark."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from app.bench.http import run as bench_run
from app.bench.servers import serve_in_thread
from app.client import (
    PixelCNNClient,
    PixelCNNError,
    parse_sse,
    png_bytes_of,
    write_heatmaps,
    write_pngs,
)
from app.imaging import png_bytes
from app.server import Settings, create_app
from app.server.cli import add_serve, settings_from_args
from tests.helpers import pixels, png_tensor, torch_threads


def pattern(size: int = 8) -> torch.Tensor:
    return (torch.arange(size * size).reshape(1, size, size) * 29 % 256).to(torch.uint8)


@pytest.fixture(scope="module")
def server(server_store):
    """(base URL, app) of a live server on the test store."""
    app = create_app(Settings(model_store=server_store, model="gray", device="cpu", threads=1))
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url:
        yield url, app


@pytest.fixture
def client(server):
    with PixelCNNClient(server[0], timeout=30) as client:
        yield client


def test_health_ready_models(client):
    assert client.health() == {"status": "ok"}
    assert client.ready()["models"] == ["cond", "gray", "rgb"]
    assert [m["name"] for m in client.models()] == ["cond", "gray", "rgb"]


def test_sample_and_png(client):
    result = client.sample(n=2, seed=7)
    assert result["seed"] == 7 and len(result["images"]) == 2
    assert pixels(client.sample(n=2, seed=7)) == pixels(result)
    png, seed = client.sample_png(seed=7)
    assert seed == 7 and torch.equal(png_tensor(png), png_tensor(png_bytes_of(client.sample(seed=7), 0)))
    labelled = client.sample(model="cond", n=2, label=["sneaker", "ankle boot"], seed=1)
    assert [i["label_name"] for i in labelled["images"]] == ["Sneaker", "Ankle boot"]


def test_stream_sample_yields_rows_then_the_result(client):
    events = list(client.stream_sample(n=2, seed=9))
    rows, final = events[:-1], events[-1]
    assert [row["row"] for row in rows] == list(range(8))
    assert pixels(final) == pixels(client.sample(n=2, seed=9))
    assert torch.equal(
        torch.tensor(rows[3]["pixels"], dtype=torch.uint8),
        torch.stack([png_tensor(i["png"]) for i in final["images"]])[:, :, 3],
    )


def test_complete_from_bytes_and_path(client, tmp_path):
    known = pattern()
    path = tmp_path / "top.png"
    path.write_bytes(png_bytes(known))
    from_path = client.complete(path, rows=3, n=2, seed=4)
    from_bytes = client.complete(png_bytes(known), rows=3, n=2, seed=4)
    assert pixels(from_path) == pixels(from_bytes) and from_path["known_rows"] == 3
    mid_row = client.complete(path, pixels=19, seed=4)  # 2 rows and 3 pixels of the third
    assert mid_row["known_pixels"] == 19 and torch.equal(
        png_tensor(mid_row["images"][0]["png"])[0, 2, :3], known[0, 2, :3]
    )
    for image in from_path["images"]:
        assert torch.equal(png_tensor(image["png"])[:, :3], known[:, :3])
    streamed = list(client.stream_complete(path, rows=6, seed=4))
    assert [e.get("row") for e in streamed[:-1]] == [6, 7] and streamed[-1]["known_rows"] == 6


def test_likelihood(client, tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(pattern()))
    result = client.likelihood([path, png_bytes(pattern())], per_pixel=True)
    first, second = result["results"]
    assert first["nll_nats"] == second["nll_nats"] > 0
    written = write_heatmaps(result, tmp_path / "heat")
    assert [p.name for p in written] == ["heatmap-0.png", "heatmap-1.png"]
    conditional = client.likelihood(png_bytes(pattern()), model="cond")["results"][0]
    assert set(conditional["class_probabilities"]) == {"T-shirt/top", "Sneaker", "Ankle boot"}


def test_errors_raise_pixelcnn_error(client):
    with pytest.raises(PixelCNNError) as caught:
        client.sample(n=0)
    assert caught.value.status == 400 and caught.value.type == "invalid_request" and caught.value.field == "n"
    assert "n: must be at least 1" in caught.value.message
    with pytest.raises(PixelCNNError) as caught:
        client.sample(model="nope")
    assert caught.value.status == 404 and "available models: cond, gray, rgb" in caught.value.message
    with pytest.raises(PixelCNNError) as caught:
        list(client.stream_sample(model="cond", label="dog"))
    assert caught.value.status == 400 and "'Sneaker'" in caught.value.message
    with pytest.raises(PixelCNNError) as caught:
        client.complete(b"not a png")
    assert "could not read the image" in caught.value.message


def test_leaving_a_stream_early_frees_the_engine(client, server):
    engine = server[1].state.registry.models["gray"].engine
    stream = client.stream_sample(n=4, seed=3)
    assert next(stream)["row"] == 0
    stream.close()  # closes the HTTP connection
    deadline = time.monotonic() + 10
    while engine.stats().active_images or engine.stats().queue_size:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)
    assert client.sample(seed=1)["seed"] == 1  # still serving


def test_api_key(server_store):
    app = create_app(Settings(model_store=server_store, model="gray", device="cpu", threads=1, api_key="k"))
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url:
        with PixelCNNClient(url) as anonymous, pytest.raises(PixelCNNError) as caught:
            anonymous.sample()
        assert caught.value.status == 401 and caught.value.type == "unauthorized"
        with PixelCNNClient(url, api_key="k") as client:
            assert client.sample(seed=2)["seed"] == 2
            assert client.health() == {"status": "ok"}


def test_write_pngs(client, tmp_path):
    result = client.sample(n=3, seed=5)
    paths = write_pngs(result, tmp_path / "out", stem="s")
    assert [p.name for p in paths] == ["s-0.png", "s-1.png", "s-2.png"]
    assert torch.equal(png_tensor(paths[1].read_bytes()), png_tensor(result["images"][1]["png"]))


@pytest.mark.parametrize(
    "lines, expected",
    [
        (["event: row", 'data: {"a":1}', "", "event: done", "data: {}", ""], [("row", '{"a":1}'), ("done", "{}")]),
        ([": keep-alive", "data: x", "", ""], [("message", "x")]),
        (["event: e", "data: line1", "data: line2", ""], [("e", "line1\nline2")]),
        (["event:tight\r", "data:nospace\r", "\r"], [("tight", "nospace")]),
        (["data: unterminated"], [("message", "unterminated")]),
        (["event: only-a-name", ""], []),
    ],
)
def test_parse_sse(lines, expected):
    assert list(parse_sse(iter(lines))) == expected


def test_serve_flags_override_environment(monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("PIXELCNN_PORT", "1234")
    monkeypatch.setenv("PIXELCNN_MODEL", "from-env")
    args = parser.parse_args(["serve", "--model-store", str(tmp_path), "--port", "9000", "--device", "cpu"])
    settings = settings_from_args(args)
    assert settings.port == 9000 and settings.model == "from-env" and settings.model_store == tmp_path
    assert settings.device == "cpu" and args.run.__name__ == "run_serve"
    assert settings_from_args(parser.parse_args(["serve"])).port == 1234
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--device", "tpu"])


def test_bench_json(server, capsys):
    assert bench_run(["--url", server[0], "--n", "4", "--concurrency", "3", "--repeats", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in (
        "sample_n_s",
        "likelihood_n_s",
        "sample_over_likelihood",
        "one_sample_s",
        "concurrent_samples_s",
        "concurrent_over_one",
        "concurrent_speedup",
        "first_row_s",
        "stream_total_s",
        "one_engine_s",
        "one_over_engine",
        "one_png_s",
        "one_png_over_engine",
        "concurrent_floor_s",
        "concurrent_over_floor",
    ):
        assert isinstance(result[key], float), key
    assert result["n"] == 4 and result["concurrency"] == 3 and result["model"] == "gray" and result["repeats"] == 2
    assert len(result["concurrent_over_one_each"]) == 2
    # The engine's share comes from the server's Server-Timing header: less than the whole request.
    assert 0 < result["one_engine_s"] < result["one_sample_s"] and result["one_over_engine"] > 1
    lanes = result["lanes"]
    assert isinstance(lanes, int) and lanes >= 1
    threads = result["one_engine_threads"]
    assert isinstance(threads, int) and 1 <= threads <= lanes, "the threads that drew the lone image"
    assert result["concurrent_floor_s"] == pytest.approx(3 * result["one_engine_s"] * threads / lanes, rel=0.5)


def test_bench_starts_its_own_server_without_a_url(server_store, capsys):
    argv = ["--model-store", str(server_store), "--model", "gray", "--device", "cpu", "--n", "2"]
    with torch_threads(torch.get_num_threads()):  # the app sets 1 thread process-wide: restore it after
        assert bench_run([*argv, "--concurrency", "2", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "gray" and result["url"].startswith("http://127.0.0.1:")
    assert 0 < result["one_engine_s"] < result["one_sample_s"]


def test_bench_table_and_unreachable_server(server, capsys):
    assert bench_run(["--url", server[0], "--n", "2", "--concurrency", "2", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "sample / likelihood" in table and "HTTP / engine, PNG" in table and "all concurrent / floor" in table
    assert bench_run(["--url", "http://127.0.0.1:9", "--n", "1"]) == 1
    assert "error:" in capsys.readouterr().err


def test_closing_a_stream_cancels_the_engine_request_over_real_http(tmp_path):
    """A 24-row model slow enough that the request is mid-image (as test_server_generation's tall_store),
    and a client that leaves after the first row: the engine must count a cancellation
    (uvicorn reports the closed connection; the server cancels the engine request)."""
    from app.model import save
    from tests.helpers import tiny_model

    save(tiny_model("gated", 1, size=24, layers=4, seed=4, hidden_channels=192).float(), tmp_path / "tall")
    app = create_app(Settings(model_store=tmp_path, device="cpu", threads=1))
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url, PixelCNNClient(url) as client:
        engine = app.state.registry.models["tall"].engine
        stream = client.stream_sample(n=2, seed=1)
        assert next(stream)["row"] == 0
        stream.close()
        deadline = time.monotonic() + 10
        while not engine.stats().requests_cancelled:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
        # The cancel is counted when the first shard leaves; with 2 lanes the other shard leaves its lane at
        # its next row boundary, so the batch empties shortly after (never by completing).
        while engine.stats().active_images:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
        assert not engine.stats().requests_completed


def test_the_client_lets_idle_connections_go_before_the_server_does():
    """A request sent on a connection the server is closing for idleness gets no answer at all: the client
    keeps idle connections for less than the server's default idle limit (httpx's own default equals it)."""
    from app.client import KEEPALIVE_S

    assert KEEPALIVE_S < Settings().keep_alive_timeout_s
    with PixelCNNClient("http://127.0.0.1:9") as remote:
        assert remote._http._transport._pool._keepalive_expiry == KEEPALIVE_S
