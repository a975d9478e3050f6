"""API keys naming tenants (PIXELCNN_API_KEYS), their priorities and caps; a request's X-Priority and
X-Request-Timeout, as the scheduler receives them, and what a passed deadline answers."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from app.server import Settings
from app.server.registry import default_engine_factory
from tests.helpers import likelihood_body, slow_scoring_factory

pytestmark = pytest.mark.anyio

KEYS = "premium:pk:2,bulk:bk:0:1,plain:xk"
JSON = {"content-type": "application/json"}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


submitted = []


def spying_factory(model, settings):
    engine = default_engine_factory(model, settings)
    submit = engine.submit

    def spy(request, rows=True):
        submitted.append((request.tenant, request.priority, request.deadline is not None))
        return submit(request, rows)

    engine.submit = spy
    return engine


def test_api_keys_are_parsed_and_bad_entries_named():
    tenants = Settings(api_keys=KEYS, api_key="solo").tenants()
    assert [(t.name, t.key, t.priority, t.max_in_progress) for t in tenants] == [
        ("premium", "pk", 2, None),
        ("bulk", "bk", 0, 1),
        ("plain", "xk", 1, None),
        ("default", "solo", 1, None),
    ]
    for bad, said in [
        ("nokey", "expected name:key"),
        ("a:k:5", "priority must be 0, 1 or 2"),
        ("a:k,b:k", "distinct keys"),
        ("bad name:k", "expected name:key"),
    ]:
        with pytest.raises(ValidationError, match=said):
            Settings(api_keys=bad)


async def test_each_key_is_its_tenant_with_its_priority_cap_and_metrics(serve):
    submitted.clear()
    async with serve(api_keys=KEYS, engine_factory=spying_factory) as (_, client):
        for key, asked in [("pk", None), ("pk", "low"), ("bk", "high"), ("xk", "2"), ("xk", None)]:
            headers = {**bearer(key), **({"x-priority": asked} if asked else {})}
            response = await client.post("/sample", json={"n": 1, "seed": 1}, headers=headers)
            assert response.status_code == 200, response.text
        assert (await client.post("/sample", json={}, headers=bearer("nope"))).status_code == 401
        metrics = (await client.get("/metrics")).text
    # A key's priority is its requests' default and the most they may ask for.
    assert submitted == [
        ("premium", 2, False),
        ("premium", 0, False),
        ("bulk", 0, False),
        ("plain", 1, False),
        ("plain", 1, False),
    ]
    assert 'pixelcnn_tenant_requests_total{status="200",tenant="premium"} 2.0' in metrics
    assert 'pixelcnn_tenant_requests_total{status="200",tenant="bulk"} 1.0' in metrics
    assert 'tenant="nope"' not in metrics


async def test_a_tenant_past_its_cap_gets_429_and_others_go_on(serve):
    async with serve(api_keys=KEYS, engine_factory=slow_scoring_factory) as (_, client):
        body = likelihood_body(16)  # 4 passes of 0.05 s on the 3-class model
        held = asyncio.ensure_future(client.post("/likelihood", content=body, headers={**JSON, **bearer("bk")}))
        await asyncio.sleep(0.05)
        refused = await client.post("/likelihood", content=body, headers={**JSON, **bearer("bk")})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "too_many_requests"
        assert "'bulk' already has 1 requests in progress" in refused.json()["error"]["message"]
        other = await client.post("/likelihood", content=body, headers={**JSON, **bearer("pk")})
        assert other.status_code == 200
        assert (await held).status_code == 200
        again = await client.post("/likelihood", content=body, headers={**JSON, **bearer("bk")})
        assert again.status_code == 200  # the cap counts requests in progress, not requests made


async def test_a_passed_deadline_is_a_504_timeout_and_stops_the_work(serve):
    async with serve(engine_factory=slow_scoring_factory) as (app, client):
        engine = app.state.registry.get("cond").engine
        body = likelihood_body(64)  # 16 passes of 0.05 s
        late = await client.post("/likelihood", content=body, headers={**JSON, "x-request-timeout": "0.12"})
        assert late.status_code == 504, late.text
        error = late.json()["error"]
        assert error["type"] == "timeout" and "X-Request-Timeout" in error["message"]
        passes = engine.stats().likelihood_passes
        assert passes <= 3 * engine.scorer.threads < 16  # those begun in 0.12 s, side by side: not all of them
        await asyncio.sleep(0.3)
        assert engine.stats().likelihood_passes == passes
        generated = await client.post("/sample", json={"n": 4}, headers={"x-request-timeout": "0.0001"})
        assert generated.status_code == 504 and generated.json()["error"]["type"] == "timeout"
        streamed = await client.post("/sample", json={"n": 4, "stream": True}, headers={"x-request-timeout": "0.0001"})
        assert streamed.status_code == 200
        last = streamed.text.strip().split("\n\n")[-1].splitlines()
        assert last[0] == "event: error" and json.loads(last[1][6:])["error"]["type"] == "timeout"
        fine = await client.post("/sample", json={"n": 1}, headers={"x-request-timeout": "60", "x-priority": "high"})
        assert fine.status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'pixelcnn_engine_requests_expired_total{model="gray"} 2.0' in metrics
    assert 'pixelcnn_engine_rows_past_deadline_total{model="gray"} 0.0' in metrics


@pytest.mark.parametrize(
    "header, value, said",
    [
        ("x-request-timeout", "soon", "X-Request-Timeout must be seconds"),
        ("x-request-timeout", "-1", "X-Request-Timeout must be seconds"),
        ("x-priority", "urgent", "X-Priority must be 0, 1, 2"),
        ("x-priority", "7", "X-Priority must be 0, 1, 2"),
    ],
)
async def test_bad_budget_headers_are_named(serve, header, value, said):
    async with serve() as (_, client):
        for path, kwargs in [("/sample", {"json": {"n": 1}}), ("/likelihood", {"content": likelihood_body(1)})]:
            response = await client.post(path, headers={**JSON, header: value}, **kwargs)
            assert response.status_code == 400, response.text
            assert said in response.json()["error"]["message"]
