"""Abandoned work stops: a /likelihood whose client leaves frees its slot at once, its scoring thread
begins no further pass, and the access log and metrics record 499. The cost cap of one request."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from app.engine.scoring import SCORE_CHUNK_IMAGES
from tests.helpers import PASS_S, likelihood_body, slow_scoring_factory

pytestmark = pytest.mark.anyio


async def call_and_leave(app, body: bytes, leave_after_s: float, whole_body: bool = True) -> list[dict]:
    """POST /likelihood straight to the ASGI app; the client disconnects `leave_after_s` after its body
    (or after the first part of it). Returns what the app sent."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": not whole_body}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/likelihood",
        "raw_path": b"/likelihood",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    return sent


async def test_dropped_likelihood_frees_its_slot_and_stops_between_passes(serve, caplog):
    # 64 unlabelled images on the 3-class model: 4 chunks x (3 classes + 1) = 16 passes, 0.8 s.
    async with serve(engine_factory=slow_scoring_factory) as (app, client):
        engine = app.state.registry.get("cond").engine
        with caplog.at_level(logging.INFO, logger="pixelcnn.access"):
            started = time.perf_counter()
            await call_and_leave(app, likelihood_body(64), leave_after_s=0.12)
            answered_s = time.perf_counter() - started
        stats = engine.stats()
        assert stats.likelihood_in_flight == 0  # the slot is free as soon as the handler returns
        assert answered_s < 0.12 + 4 * PASS_S, answered_s
        passes_when_left = stats.likelihood_passes
        assert passes_when_left < 16
        await asyncio.sleep(6 * PASS_S)
        assert engine.stats().likelihood_passes <= passes_when_left + 1  # at most the pass under way
        assert engine.stats().likelihood_cancelled == 1
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pixelcnn.access"]
        assert [(line["route"], line["status"]) for line in lines] == [("/likelihood", 499)]
        metrics = (await client.get("/metrics")).text
        assert 'pixelcnn_requests_total{method="POST",route="/likelihood",status="499"} 1.0' in metrics
        assert 'pixelcnn_failures_total{reason="client_disconnected"} 1.0' in metrics
        # The server still scores: a full request after the dropped one gets all its passes.
        response = await client.post(
            "/likelihood", content=likelihood_body(20), headers={"content-type": "application/json"}
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 20


async def test_a_client_gone_in_the_middle_of_its_body_is_logged_as_499(serve, caplog):
    async with serve() as (app, client):
        with caplog.at_level(logging.INFO, logger="pixelcnn.access"):
            sent = await call_and_leave(app, b'{"images": [', leave_after_s=0, whole_body=False)
        assert sent == []  # nobody to answer
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pixelcnn.access"]
        assert [(line["path"], line["status"]) for line in lines] == [("/likelihood", 499)]
        assert 'status="499"' in (await client.get("/metrics")).text


async def test_likelihood_cost_cap_names_the_limit(serve):
    async with serve(max_likelihood_passes=8) as (_, client):
        n = 2 * SCORE_CHUNK_IMAGES + 1  # 3 chunks: 12 passes unlabelled (3 classes + 1), 3 with a label
        unlabelled = json.loads(likelihood_body(n))
        refused = await client.post("/likelihood", json=unlabelled)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["field"] == "label"
        assert "12 forward passes" in error["message"] and "limit of 8" in error["message"]
        assert "PIXELCNN_MAX_LIKELIHOOD_PASSES" in error["message"] and "give a label" in error["message"]
        labelled = await client.post("/likelihood", json={**unlabelled, "label": 1})
        assert labelled.status_code == 200, labelled.text
        gray = await client.post("/likelihood", json={**unlabelled, "model": "gray"})
        assert gray.status_code == 200, gray.text  # unconditional: 3 passes
