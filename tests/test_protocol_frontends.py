"""What the OpenAI and V2 front ends share with the native API, in-process: the API key, the body limit,
request ids and metrics by route, each error in the protocol's own format."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio

V2_INFER = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [0] * 64}]}


async def test_api_key_guards_every_post_in_each_protocols_format(serve):
    async with serve(api_key="s3cret") as (_, client):
        openai = await client.post("/v1/images/generations", json={"prompt": ""})
        assert openai.status_code == 401 and openai.headers["www-authenticate"] == "Bearer"
        assert openai.json() == {
            "error": {
                "message": "missing API key: send the header 'Authorization: Bearer <key>'",
                "type": "invalid_request_error",
                "param": None,
                "code": "unauthorized",
            }
        }
        for path in ("/v2/models/gray/infer", "/v2/models/gray/generate"):
            v2 = await client.post(path, json=V2_INFER, headers={"Authorization": "Bearer nope"})
            assert v2.status_code == 401 and v2.json() == {"error": "wrong API key"}
        key = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/v1/images/generations", json={"prompt": ""}, headers=key)).status_code == 200
        assert (await client.post("/v2/models/gray/infer", json=V2_INFER, headers=key)).status_code == 200
        for path in ("/v1/models", "/v2", "/v2/health/ready", "/v2/models/gray"):  # reads stay open
            assert (await client.get(path)).status_code == 200


async def test_body_limit_in_each_protocols_format(serve):
    async with serve(max_upload_bytes=1000) as (_, client):
        big = {"prompt": "x" * 2000}
        openai = await client.post("/v1/images/generations", json=big)
        assert openai.status_code == 413 and openai.json()["error"]["code"] == "payload_too_large"
        v2 = await client.post("/v2/models/gray/infer", json={**V2_INFER, "id": "x" * 2000})
        assert v2.status_code == 413 and "limit of 1000 bytes" in v2.json()["error"]
        native = await client.post("/sample", json={"label": "x" * 2000})
        assert native.status_code == 413 and native.json()["error"]["type"] == "payload_too_large"


async def test_request_ids_and_metrics_by_route(serve):
    async with serve() as (_, client):
        given = {"X-Request-ID": "client-42"}
        ok = await client.post("/v1/images/generations", json={"prompt": "", "n": 2, "seed": 1}, headers=given)
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-42"
        assert ok.headers["x-seed"] == "1"
        bad = await client.post("/v2/models/gray/infer", json={"inputs": []})
        assert bad.status_code == 400 and len(bad.headers["x-request-id"]) == 32
        assert (await client.post("/v2/models/gray/infer", json=V2_INFER)).status_code == 200
        metrics = (await client.get("/metrics")).text
        for line in (
            'pixelcnn_requests_total{method="POST",route="/v1/images/generations",status="200"} 1.0',
            'pixelcnn_requests_total{method="POST",route="/v2/models/{name}/infer",status="400"} 1.0',
            'pixelcnn_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"} 1.0',
            'pixelcnn_request_images_sum{route="/v1/images/generations"} 2.0',
            'pixelcnn_images_scored_total{model="gray"} 1.0',
            'pixelcnn_images_generated_total{model="gray"} 2.0',
        ):
            assert line in metrics, line
