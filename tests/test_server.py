"""HTTP server: health, readiness, model listing, metrics, settings, and the error format of every
input rule (status code and message). Generation and likelihood have their own test files."""

from __future__ import annotations

import re
import shutil

import pytest

from app.server import Settings, create_app
from app.server.outputs import choose_format

pytestmark = pytest.mark.anyio


def assert_error(response, status: int, type_: str, *fragments: str, field: str | None = None) -> dict:
    """The one error format: {"error": {"type", "message", "field"?}}, with `fragments` in the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == type_
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
    if field is not None:
        assert error.get("field") == field
    return error


# Health, readiness, model store.


async def test_health_and_ready(serve):
    async with serve() as (_, client):
        assert (await client.get("/health")).json() == {"status": "ok"}
        ready = await client.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "models": ["cond", "gray", "rgb"], "default": "gray"}


@pytest.mark.parametrize(
    "layout, reason",
    [
        ("missing", "does not exist"),
        ("empty", "has no model folder"),
        ("broken", "could not be loaded"),
    ],
)
async def test_store_without_loadable_model_starts_but_is_not_ready(serve, tmp_path, layout, reason):
    store = tmp_path / "store"
    if layout != "missing":
        store.mkdir()
    if layout == "broken":
        (store / "bad").mkdir()
        (store / "bad" / "config.json").write_text("{}")  # no weights
    async with serve(model_store=store, model=None) as (_, client):
        assert (await client.get("/health")).json() == {"status": "ok"}
        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not_ready"
        assert reason in ready.json()["reason"]
        assert_error(ready, 503, "not_ready", reason)
        assert_error(await client.post("/sample", json={}), 503, "not_ready", "no model is loaded", reason)
        assert (await client.get("/models")).json() == []


async def test_broken_model_does_not_stop_the_others(serve, server_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(server_store / "gray", store / "gray")
    (store / "zz-broken").mkdir()
    (store / "zz-broken" / "config.json").write_text('{"arch": "nope"}')
    async with serve(model_store=store) as (_, client):
        ready = await client.get("/ready")
        assert ready.status_code == 200 and ready.json()["models"] == ["gray"]
        assert "zz-broken: could not be loaded" in ready.json()["problems"][0]
        assert (await client.post("/sample", json={"seed": 1})).status_code == 200


async def test_configured_default_missing_from_store_is_not_ready(serve):
    async with serve(model="nope") as (_, client):
        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert "'nope' is not in the model store" in ready.json()["reason"]
        error = assert_error(await client.post("/sample", json={}), 404, "not_found", "'nope'", "cond, gray, rgb")
        assert error["field"] == "model"
        assert (await client.post("/sample", json={"model": "gray", "seed": 1})).status_code == 200


async def test_default_model_is_fashion_mnist_if_present_else_first(serve, server_store, tmp_path):
    store = tmp_path / "store"
    for name in ("gray", "cond"):
        shutil.copytree(server_store / name, store / name)
    async with serve(model_store=store, model=None) as (_, client):
        assert (await client.get("/ready")).json()["default"] == "cond"
    shutil.copytree(server_store / "gray", store / "fashion-mnist")
    async with serve(model_store=store, model=None) as (_, client):
        assert (await client.get("/ready")).json()["default"] == "fashion-mnist"
        defaults = [m["name"] for m in (await client.get("/models")).json() if m["default"]]
        assert defaults == ["fashion-mnist"]


async def test_preload_default_loads_only_the_default(serve):
    async with serve(preload="default", model="rgb") as (_, client):
        assert [m["name"] for m in (await client.get("/models")).json()] == ["rgb"]
        assert_error(
            await client.post("/sample", json={"model": "gray"}),
            404,
            "not_found",
            "unknown model 'gray'",
            "available models: rgb",
        )


async def test_models_listing(serve):
    async with serve() as (_, client):
        models = {m["name"]: m for m in (await client.get("/models")).json()}
        assert list(models) == ["cond", "gray", "rgb"]
        cond, gray, rgb = models["cond"], models["gray"], models["rgb"]
        assert cond["conditional"] and not gray["conditional"]
        assert cond["classes"] == [
            {"index": 0, "name": "T-shirt/top"},
            {"index": 1, "name": "Sneaker"},
            {"index": 2, "name": "Ankle boot"},
        ]
        assert gray["classes"] == [] and gray["default"] and not rgb["default"]
        assert gray["shape"] == [1, 8, 8] and rgb["shape"] == [3, 8, 8]
        assert gray["arch"] == "gated" and rgb["arch"] == "pixelcnn"
        assert gray["parameters"] > 1000
        assert gray["metrics"] == {"dataset": "tiny", "test_bits_per_dim": 7.5}  # history dropped
        assert rgb["metrics"] is None
        one = await client.get("/models/rgb")
        assert one.json() == rgb
        assert_error(await client.get("/models/nope"), 404, "not_found", "unknown model 'nope'", "cond, gray, rgb")


# Metrics.


async def test_metrics(serve):
    async with serve() as (_, client):
        assert (await client.post("/sample", json={"n": 2, "seed": 1})).status_code == 200
        assert (await client.post("/sample", json={"n": 0})).status_code == 400
        response = await client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        text = response.text
        lanes = int(float(re.search(r'pixelcnn_engine_lanes\{model="gray"\} (\S+)', text).group(1)))
        steps = 8 * min(lanes, 2)  # the 2 images are split into one shard per lane, each drawing 8 rows
        for line in (
            'pixelcnn_requests_total{method="POST",route="/sample",status="200"} 1.0',
            'pixelcnn_requests_total{method="POST",route="/sample",status="400"} 1.0',
            'pixelcnn_rows_total{model="gray"} 16.0',  # 8 rows of 2 images
            'pixelcnn_images_generated_total{model="gray"} 2.0',
            'pixelcnn_failures_total{reason="invalid_request"} 1.0',
            'pixelcnn_time_to_first_row_seconds_count{model="gray"} 1.0',
            'pixelcnn_queue_size{model="gray"}',
            'pixelcnn_active_images{model="gray"} 0.0',
            'pixelcnn_engine_lanes{model="gray"}',
            'pixelcnn_model_loaded{model="rgb",running="true"} 1.0',
            "# TYPE pixelcnn_engine_requests_completed_total counter",  # monotonic engine stats are counters
            'pixelcnn_engine_requests_completed_total{model="gray"} 1.0',
            f'pixelcnn_engine_rows_decoded_total{{model="gray"}} {steps:.1f}',
            "# TYPE pixelcnn_engine_active_requests gauge",
            'pixelcnn_queue_wait_seconds_count{model="gray"} 1.0',  # one request joined a batch
            f'pixelcnn_row_decode_seconds_count{{model="gray"}} {steps:.1f}',  # one per decode step
            "# TYPE pixelcnn_row_decode_seconds histogram",
        ):
            assert line in text, line
        assert "pixelcnn_engine_requests_completed{" not in text  # no gauge twin of a counter
        assert 'pixelcnn_request_duration_seconds_count{method="POST",route="/sample",status="200"} 1.0' in text


async def test_each_app_has_its_own_metrics(serve):
    async with serve() as (_, first), serve() as (_, second):
        await first.get("/health")
        assert 'route="/health"' in (await first.get("/metrics")).text
        assert 'route="/health"' not in (await second.get("/metrics")).text


async def test_unmatched_routes_share_one_metrics_label(serve):
    async with serve() as (_, client):
        await client.get("/nope/1")
        await client.get("/nope/2")
        assert (
            'pixelcnn_requests_total{method="GET",route="unmatched",status="404"} 2.0'
            in (await client.get("/metrics")).text
        )


# The error format for every input rule.


async def test_unknown_route_and_method(serve):
    async with serve() as (_, client):
        assert_error(await client.get("/nope"), 404, "not_found", "no route GET /nope")
        assert_error(
            await client.get("/sample"), 405, "method_not_allowed", "GET is not allowed on /sample; allowed: POST"
        )


@pytest.mark.parametrize(
    "body, fragments, field",
    [
        ({"n": 0}, ["n: must be at least 1", "got 0"], "n"),
        ({"n": 65}, ["n must be between 1 and 64", "got 65"], "n"),
        ({"n": "many"}, ["n: must be an integer"], "n"),
        ({"n": "3"}, ["n: must be an integer"], "n"),  # JSON numbers are numbers (form fields are text)
        ({"n": True}, ["n: must be an integer"], "n"),
        ({"stream": 0}, ["stream: must be true or false"], "stream"),
        ({"n": 1.5}, ["n:", "integer"], "n"),
        ({"temperature": 0}, ["temperature: must be between 0.05 and 20.0, got 0"], "temperature"),
        ({"temperature": -1.0}, ["temperature: must be between 0.05 and 20.0"], "temperature"),
        ({"temperature": 0.049}, ["temperature: must be between 0.05 and 20.0, got 0.049"], "temperature"),
        ({"temperature": 1e308}, ["temperature: must be between 0.05 and 20.0"], "temperature"),
        ({"temperature": 1e-309}, ["temperature: must be between 0.05 and 20.0"], "temperature"),
        ({"seed": -1}, ["seed: must be between 0 and 9223372036854775807, got -1"], "seed"),
        ({"seed": 2**64}, ["seed"], "seed"),
        ({"temprature": 0.5}, ["temprature: unknown field"], "temprature"),
        ({"label": 1}, ["model 'gray' is unconditional"], "label"),
        (
            {"model": "cond", "label": "snekaer"},
            ["unknown label 'snekaer'", "'T-shirt/top', 'Sneaker', 'Ankle boot'", "0..2"],
            "label",
        ),
        ({"model": "cond", "label": 3}, ["unknown label 3", "0..2"], "label"),
        ({"model": "cond", "label": -1}, ["unknown label -1"], "label"),
        ({"model": "cond", "n": 3, "label": [0, 1]}, ["got 2 labels for 3 images"], "label"),
        ({"model": "cond", "label": True}, ["label: must be a class index (integer), a class name"], "label"),
        ({"model": "cond", "label": 1.0}, ["label: must be a class index"], "label"),
    ],
)
async def test_sample_input_errors(serve, body, fragments, field):
    async with serve() as (_, client):
        assert_error(await client.post("/sample", json=body), 400, "invalid_request", *fragments, field=field)


async def test_sample_limit_follows_settings(serve):
    async with serve(max_images_per_request=4) as (_, client):
        assert_error(await client.post("/sample", json={"n": 5}), 400, "invalid_request", "between 1 and 4")


async def test_malformed_bodies(serve):
    async with serve() as (_, client):
        headers = {"content-type": "application/json"}
        assert_error(
            await client.post("/sample", content=b"{nope", headers=headers), 400, "invalid_request", "not valid JSON"
        )
        assert_error(await client.post("/sample", content=b"[1, 2]", headers=headers), 400, "invalid_request")
        assert_error(
            await client.post("/likelihood", content=b"{nope", headers=headers),
            400,
            "invalid_request",
            "not valid JSON",
        )
        assert_error(
            await client.post("/likelihood", content=b"hello", headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
            "'text/plain'",
            "multipart/form-data",
        )
        assert_error(
            await client.post("/complete", content=b"[]", headers=headers),
            400,
            "invalid_request",
            "expected a JSON object",
        )


async def test_unknown_model(serve):
    async with serve() as (_, client):
        for path, body in (("/sample", {}), ("/likelihood", {"images": []}), ("/complete", {"image": ""})):
            error = assert_error(
                await client.post(path, json={"model": "nope", **body}),
                404,
                "not_found",
                "unknown model 'nope'",
                "available models: cond, gray, rgb",
            )
            assert error["field"] == "model"


# Limits, authentication, CORS.


async def test_body_over_limit_is_413(serve):
    async with serve(max_upload_bytes=1000) as (_, client):
        big = {"images": ["A" * 2000]}
        assert_error(await client.post("/likelihood", json=big), 413, "payload_too_large", "limit of 1000 bytes")

        async def chunks():  # no Content-Length: counted while read
            for _ in range(5):
                yield b"x" * 400

        assert_error(
            await client.post("/likelihood", content=chunks(), headers={"content-type": "application/json"}),
            413,
            "payload_too_large",
        )
        assert (await client.post("/sample", json={"seed": 1})).status_code == 200  # small bodies pass
        assert 'pixelcnn_failures_total{reason="payload_too_large"} 2.0' in (await client.get("/metrics")).text


async def test_api_key(serve):
    async with serve(api_key="s3cret") as (_, client):
        for path in ("/sample", "/complete", "/likelihood"):
            response = await client.post(path, json={})
            assert_error(response, 401, "unauthorized", "Authorization: Bearer")
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = await client.post("/sample", json={}, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "unauthorized", "wrong API key")
        ok = await client.post("/sample", json={"seed": 1}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        for path in ("/health", "/ready", "/models", "/metrics"):  # read-only routes stay open
            assert (await client.get(path)).status_code == 200


async def test_cors_off_by_default_and_on_when_configured(serve):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    async with serve() as (_, client):
        response = await client.get("/health", headers={"Origin": "http://ui.example"})
        assert "access-control-allow-origin" not in response.headers
    async with serve(cors_origins=["http://ui.example"]) as (_, client):
        response = await client.options("/sample", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://ui.example"
        response = await client.post("/sample", json={"seed": 1}, headers={"Origin": "http://ui.example"})
        assert "X-Seed" in response.headers["access-control-expose-headers"]


# Settings.


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PIXELCNN_MODEL_STORE", str(tmp_path))
    monkeypatch.setenv("PIXELCNN_PORT", "9001")
    monkeypatch.setenv("PIXELCNN_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("PIXELCNN_API_KEY", "")
    monkeypatch.setenv("PIXELCNN_MAX_QUEUE", "3")
    settings = Settings()
    assert settings.model_store == tmp_path and settings.port == 9001 and settings.max_queue == 3
    assert settings.cors_origins == ["http://a.example", "http://b.example"]
    assert settings.api_key is None
    defaults = Settings(_env_file=None)
    assert defaults.max_batch_images == 64 and defaults.max_upload_bytes == 2 * 1024 * 1024


def test_settings_reject_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(device="tpu")
    with pytest.raises(ValidationError):
        Settings(max_batch_images=0)


def test_scoring_nice_reaches_the_engines_scorer(monkeypatch, tmp_path):
    import torch

    from app.engine.scoring import SCORING_NICE
    from app.server.registry import default_engine_factory
    from tests.helpers import tiny_model

    model = tiny_model("gated", num_classes=2, dtype=torch.float32)
    assert Settings(_env_file=None).scoring_nice == SCORING_NICE  # the server's default is the engine's
    monkeypatch.setenv("PIXELCNN_SCORING_NICE", "4")
    assert default_engine_factory(model, Settings(_env_file=None)).scorer.nice == 4
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="scoring_nice"):
            Settings(_env_file=None, scoring_nice=bad)


def test_lanes_default_to_one_on_a_gpu_and_one_per_threads_cores_on_a_cpu(monkeypatch):
    import app.server.settings as settings_module

    monkeypatch.setattr(settings_module, "usable_cpus", lambda: 6)
    assert Settings(_env_file=None).lanes_for("cuda") == 1
    assert Settings(_env_file=None).lanes_for("cpu") == 6
    assert Settings(_env_file=None, threads=4).lanes_for("cpu") == 1
    assert Settings(_env_file=None, lanes=3).lanes_for("cuda") == 3  # an explicit number always wins
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: 64)
    assert Settings(_env_file=None).lanes_for("cpu") == 8
    with pytest.raises(ValueError):
        Settings(lanes=0)


def test_usable_cpus_follow_affinity_and_a_cgroup_quota(monkeypatch, tmp_path):
    import os

    from app.server.settings import usable_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert usable_cpus(tmp_path / "absent") == 16
    v2 = tmp_path / "v2"
    v2.mkdir()
    for cpu_max, expected in (("max 100000", 16), ("250000 100000", 3), ("50000 100000", 1), ("3200000 100000", 16)):
        (v2 / "cpu.max").write_text(cpu_max + "\n")  # --cpus 2.5 gives 3; a quota above the affinity is moot
        assert usable_cpus(v2) == expected, cpu_max
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    for quota, expected in (("-1", 16), ("200000", 2)):
        (v1 / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
        assert usable_cpus(v1) == expected, quota


def test_create_app_loads_nothing_at_import_or_creation(tmp_path):
    app = create_app(Settings(model_store=tmp_path / "never-read"))
    assert app.state.registry.models == {}


@pytest.mark.parametrize(
    "accept, stream, expected",
    [
        (None, False, "json"),
        ("*/*", False, "json"),
        ("application/json", False, "json"),
        ("image/png", False, "png"),
        ("image/*", False, "png"),
        ("text/event-stream", False, "sse"),
        ("image/png", True, "sse"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", False, "json"),
        ("application/json;q=0.5, image/png", False, "png"),
        ("image/png;q=0, application/json", False, "json"),
        ("image/webp", False, "json"),
    ],
)
def test_choose_format(accept, stream, expected):
    assert choose_format(accept, stream) == expected


def test_the_http_layer_does_not_import_torch():
    """Routes decode requests into plain arrays and encode plain arrays: torch stays in the engine."""
    import ast
    from pathlib import Path

    import app.server

    offenders = []
    for path in Path(app.server.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "torch"]
    assert offenders == []


async def test_pickled_weights_are_refused_with_a_clear_message_and_never_unpickled(serve, server_store, tmp_path):
    """A model folder holding a .pt/.pkl/.bin instead of model.safetensors: the pickle would write a file
    if it were ever loaded; the server reports the folder and stays up with the other models."""
    import pickle

    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    store = tmp_path / "store"
    shutil.copytree(server_store / "gray", store / "gray")
    for name in ("model.pt", "weights.pkl", "pytorch_model.bin"):
        folder = store / f"pickled-{name.split('.')[1]}"
        folder.mkdir()
        shutil.copy(server_store / "gray" / "config.json", folder / "config.json")
        (folder / name).write_bytes(pickle.dumps(Trap()))
    async with serve(model_store=store) as (_, client):
        ready = (await client.get("/ready")).json()
        assert ready["models"] == ["gray"]
        problems = " ".join(ready["problems"])
        for name in ("model.pt", "weights.pkl", "pytorch_model.bin"):
            assert f"never from pickle files (found {name}, not opened)" in problems
    assert not marker.exists()


async def test_docs_load_everything_from_the_server_itself(serve):
    """Behind a gateway without internet /docs must still work: no script, style or font from a CDN."""
    import re

    async with serve() as (_, client):
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            urls = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
            assert urls, page
            assert not [u for u in urls if "://" in u or u.startswith("//")], (page, urls)
            for url in (u for u in urls if u.endswith((".js", ".css"))):
                asset = await client.get(url)
                assert asset.status_code == 200 and len(asset.content) > 10_000, url


async def test_every_response_has_a_request_id_that_errors_and_the_access_log_repeat(serve, caplog):
    import json
    import logging

    async with serve() as (_, client):
        with caplog.at_level(logging.INFO, logger="pixelcnn.access"):
            ok = await client.post("/sample", json={"n": 2, "seed": 1})
            bad = await client.post("/sample", json={"temperature": 99})
            mine = await client.get("/health", headers={"X-Request-ID": "gateway-7f3a"})
            odd = await client.get("/health", headers={"X-Request-ID": "not ok\\n"})
    assert len(ok.headers["x-request-id"]) == 32 and ok.headers["x-request-id"] != bad.headers["x-request-id"]
    assert bad.json()["error"]["request_id"] == bad.headers["x-request-id"]
    assert mine.headers["x-request-id"] == "gateway-7f3a"  # a sane id from the caller is kept
    assert odd.headers["x-request-id"] != "not ok\\n"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pixelcnn.access"]
    by_id = {line["request_id"]: line for line in lines}
    sample = by_id[ok.headers["x-request-id"]]
    assert sample["route"] == "/sample" and sample["status"] == 200 and sample["model"] == "gray"
    assert sample["images"] == 2 and sample["duration_s"] > 0
    assert by_id[bad.headers["x-request-id"]]["status"] == 400


async def test_metrics_pass_promtool_check(serve):
    """Prometheus' own linter accepts the exposition (counters named _total, HELP and TYPE for all).
    .ci/run installs Debian's prometheus package for promtool."""
    import shutil as sh
    import subprocess

    promtool = sh.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    async with serve() as (_, client):
        assert (await client.post("/sample", json={"n": 1, "seed": 1})).status_code == 200
        assert (await client.post("/sample", json={"n": 0})).status_code == 400
        text = (await client.get("/metrics")).text
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_the_grafana_dashboard_only_uses_metrics_the_server_exports(serve):
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "deploy/grafana/pixelcnn-dashboard.json").read_text())
    async with serve() as (_, client):
        await client.post("/sample", json={"n": 1, "seed": 1})
        await client.post("/sample", json={"n": 0})
        image = (await client.post("/sample", json={"n": 1}, headers={"Accept": "image/png"})).content
        await client.post("/likelihood", files={"image": ("x.png", image, "image/png")})
        exported = {
            line.split("{")[0].split(" ")[0]
            for line in (await client.get("/metrics")).text.splitlines()
            if line and not line.startswith("#")
        }
        exported |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported}
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(pixelcnn_[a-z_]+|process_[a-z_]+)", target["expr"])
    }
    for name in used:  # engine error counters appear only once an error happened: check the family name
        family = name.removesuffix("_total")
        assert name in exported or any(e.startswith(family) for e in exported) or "errors" in name, name
    assert len(dashboard["panels"]) >= 8
