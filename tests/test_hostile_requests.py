"""Odd requests a hostile client sends: deeply nested JSON, bodies without the API key, HEAD, arbitrary
methods, and the metrics labels they must not multiply."""

from __future__ import annotations

import pytest

from tests.helpers import without_request_id

pytestmark = pytest.mark.anyio

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("path", ["/sample", "/complete", "/likelihood"])
async def test_deeply_nested_json_is_a_400_with_the_request_id(serve, path):
    async with serve() as (_, client):
        response = await client.post(path, content=DEEP, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = without_request_id(response.json(), response)["error"]
        assert error["type"] == "invalid_request"
        metrics = (await client.get("/metrics")).text
        assert 'reason="internal"' not in metrics


@pytest.mark.parametrize("path", ["/sample", "/complete", "/likelihood"])
@pytest.mark.parametrize("body", ["{not json", DEEP, '{"n": 1000}'])
async def test_the_api_key_is_checked_before_the_body(serve, path, body):
    async with serve(api_key="s3cret") as (_, client):
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert without_request_id(response.json(), response)["error"]["type"] == "unauthorized"
        wrong = await client.post(path, content=body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "wrong API key"
        keyed = await client.post(path, content=body, headers={"authorization": "bearer s3cret"})
        assert keyed.status_code == 400  # with the key, the body is read and found wrong


@pytest.mark.parametrize("path", ["/health", "/ready", "/models", "/models/gray", "/metrics", "/", "/static/demo.js"])
async def test_head_answers_like_get_without_a_body(serve, path):
    async with serve() as (_, client):
        get = await client.get(path)
        head = await client.head(path)
        assert get.status_code == head.status_code == 200
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        if path not in ("/metrics", "/ready"):  # their bodies change between two calls
            assert head.headers["content-length"] == str(len(get.content))
        assert (await client.head("/sample")).status_code == 405


async def test_metric_labels_stay_bounded(serve):
    async with serve() as (_, client):
        for method in ("FOO", "BAR", "X" * 40, "PROPFIND"):
            assert (await client.request(method, "/health")).status_code == 405
        await client.get("/static/demo.js")
        await client.get("/static/demo.css")
        await client.get("/static/nope.js")
        await client.get("/openapi.json")
        await client.get("/docs")
        metrics = (await client.get("/metrics")).text
    requests = [line for line in metrics.splitlines() if line.startswith("pixelcnn_requests_total{")]
    assert 'pixelcnn_requests_total{method="other",route="/health",status="405"} 4.0' in requests
    assert not any("FOO" in line or "PROPFIND" in line for line in requests)
    assert 'pixelcnn_requests_total{method="GET",route="/static",status="200"} 2.0' in requests
    assert 'pixelcnn_requests_total{method="GET",route="/static",status="404"} 1.0' in requests
    assert 'pixelcnn_requests_total{method="GET",route="/openapi.json",status="200"} 1.0' in requests
    assert 'pixelcnn_requests_total{method="GET",route="/docs",status="200"} 1.0' in requests
    assert not any('route="unmatched"' in line for line in requests)
