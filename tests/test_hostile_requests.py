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


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("HEAD", "/sample", "POST"),
        ("GET", "/sample", "POST"),
        ("PUT", "/likelihood", "POST"),
        ("DELETE", "/complete", "POST"),
        ("POST", "/health", "GET, HEAD"),
        ("PATCH", "/models", "GET, HEAD"),
        ("HEAD", "/v1/images/generations", "POST"),
        ("GET", "/v2/models/gray/infer", "POST"),
    ],
)
async def test_405_names_the_method_used_and_lists_the_allowed_ones(serve, method, path, allowed):
    """In each protocol's error format (ours, OpenAI's, V2's); a HEAD answer has no body, but its
    Content-Length is that of the error naming HEAD (the GET's error with the method and id swapped)."""
    async with serve() as (_, client):
        response = await client.request(method, path)
        assert response.status_code == 405
        assert response.headers["allow"] == allowed
        message = f"{method} is not allowed on {path}; allowed: {allowed}"
        if method == "HEAD":
            assert response.content == b""
            get = await client.get(path)
            body = get.text.replace(f"GET is not allowed on {path}", f"HEAD is not allowed on {path}")
            body = body.replace(get.headers["x-request-id"], response.headers["x-request-id"])
            assert message in body and response.headers["content-length"] == str(len(body.encode()))
        else:
            assert message in response.text, response.text


async def test_404_names_the_method_used(serve):
    async with serve() as (_, client):
        head = await client.head("/nope")
        get = await client.get("/nope")
        assert head.status_code == get.status_code == 404
        assert get.json()["error"]["message"] == "no route GET /nope; see /docs for the API"
        body = get.text.replace("no route GET", "no route HEAD").replace(get.headers["x-request-id"], "x" * 32)
        assert head.headers["content-length"] == str(len(body.encode()) - 32 + len(head.headers["x-request-id"]))
