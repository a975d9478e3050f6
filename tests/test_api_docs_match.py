"""The API docs say what the server does: for each native route, the statuses in the OpenAPI schema are
exactly the statuses the server is seen to return here (each one provoked); no route documents the 422
FastAPI would (the server sends 400); and /redoc, like /docs, loads nothing from another host."""

from __future__ import annotations

import re

import pytest
import torch

from app.imaging import png_bytes
from tests.helpers import failing_once

pytestmark = pytest.mark.anyio

IMAGE = {"image": ("x.png", png_bytes(torch.zeros(1, 8, 8, dtype=torch.uint8)), "image/png")}


async def observed_statuses(serve, tmp_path) -> dict[tuple[str, str], set[int]]:
    """(method, path) -> every status provoked for it: success, each error the route can give."""
    seen: dict[tuple[str, str], set[int]] = {}

    def record(method: str, path: str, response) -> None:
        seen.setdefault((method, path), set()).add(response.status_code)

    big = {"n": 1, "pad": "x" * 5000}
    async with serve(max_upload_bytes=4000) as (app, client):
        for path in ("/health", "/ready", "/models", "/models/gray", "/metrics"):
            record("get", path, await client.get(path))
            record("get", path, await client.post(path))  # 405
        record("get", "/models/{name}", await client.get("/models/nope"))
        seen[("get", "/models/{name}")] |= seen.pop(("get", "/models/gray"))
        for path, body in (("/sample", {"n": 1, "seed": 1}), ("/complete", None), ("/likelihood", None)):
            ok = (
                await client.post(path, json=body)
                if body
                else await client.post(path, files=IMAGE, data={"seed": "1"} if path == "/complete" else {})
            )
            record("post", path, ok)
            record("post", path, await client.get(path))  # 405
            record("post", path, await client.post(path, json={"n": 0, "image": "x", "images": ["x"]}))  # 400
            record("post", path, await client.post(path, json={"model": "nope", "images": []}))  # 404 or 400
            if path == "/sample":
                record("post", path, await client.post(path, json={"model": "nope"}))
            else:
                record("post", path, await client.post(path, files=IMAGE, data={"model": "nope"}))
            record("post", path, await client.post(path, json=big))  # 413
            record("post", path, await client.post(path, content=b"x", headers={"content-type": "text/plain"}))
            gzip = {"content-type": "application/json", "content-encoding": "gzip"}
            record("post", path, await client.post(path, content=b"x", headers=gzip))  # 415
            late = {"x-request-timeout": "0.000000001"}  # the deadline has passed when the work would start
            if path == "/sample":
                record("post", path, await client.post(path, json={"n": 1}, headers=late))  # 504
            else:
                record("post", path, await client.post(path, files=IMAGE, headers=late))
        engine = app.state.registry.models["gray"].engine
        engine.sampler.prefill = failing_once(engine.sampler.prefill, error=RuntimeError("planted"))
        record("post", "/sample", await client.post("/sample", json={"seed": 1}))  # 500
        engine.sampler.prefill = failing_once(engine.sampler.prefill, error=RuntimeError("planted"))
        record("post", "/complete", await client.post("/complete", files=IMAGE))  # 500
        engine.scorer._forward = failing_once(engine.scorer._forward, error=RuntimeError("planted"))
        record("post", "/likelihood", await client.post("/likelihood", files=IMAGE))  # 500
    async with serve(api_key="k") as (_, client):
        for path in ("/sample", "/complete", "/likelihood"):
            record("post", path, await client.post(path, json={}))  # 401
    empty = tmp_path / "empty-store"
    empty.mkdir()
    async with serve(model_store=empty) as (_, client):
        record("get", "/ready", await client.get("/ready"))  # 503 not ready
        record("post", "/sample", await client.post("/sample", json={}))
        record("post", "/complete", await client.post("/complete", files=IMAGE))
        record("post", "/likelihood", await client.post("/likelihood", files=IMAGE))
    return seen


async def test_each_native_route_documents_exactly_the_statuses_it_returns(serve, tmp_path):
    seen = await observed_statuses(serve, tmp_path)
    async with serve() as (_, client):
        schema = (await client.get("/openapi.json")).json()
    for (method, path), statuses in sorted(seen.items()):
        documented = {int(status) for status in schema["paths"][path][method]["responses"]}
        assert documented == statuses, (method, path, sorted(documented), sorted(statuses))


async def test_no_route_documents_422_and_each_error_has_a_body_schema(serve):
    async with serve() as (_, client):
        schema = (await client.get("/openapi.json")).json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            assert "405" in responses, (method, path)
            for status, response in responses.items():
                if status[0] in "45":
                    assert response.get("content", {}).get("application/json", {}).get("schema"), (path, status)
    assert "HTTPValidationError" not in schema["components"]["schemas"]


async def test_redoc_loads_nothing_from_another_host(serve):
    async with serve() as (_, client):
        html = (await client.get("/redoc")).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert urls and not [u for u in urls if "://" in u or u.startswith("//")], urls
        scripts = [u for u in urls if u.endswith(".js")]
        assert scripts
        for url in scripts:
            script = await client.get(url)
            assert script.status_code == 200 and len(script.content) > 100_000, url
            # what the script itself loads: images (src), styles and fonts (url(...)), fetches
            loaded = re.findall(rb'src:"(https?:[^"]+)"|url\((https?:[^)]+)\)', script.content)
            assert not loaded, loaded
            assert b"cdn.redoc.ly" not in script.content
