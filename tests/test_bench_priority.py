"""The priority benchmark's bulk client (a bare HTTP/1.1 client on asyncio streams) against a real server:
its statuses are the server's, its headers reach the server, and a dead server is status 0, not an
exception that would end the flood."""

from __future__ import annotations

import asyncio

import torch

from app.bench.priority import bulk_http_sample
from app.bench.servers import free_port, serve_in_thread
from app.server import Settings, create_app
from tests.helpers import torch_threads


def test_the_bulk_client_gets_the_server_s_answers_over_kept_connections(server_store):
    app = create_app(Settings(model_store=server_store, model="gray", device="cpu", threads=1, max_queue=1))
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url:
        sample = bulk_http_sample(url)

        async def scenario():
            alone = [await sample(seed, {"X-Priority": "low"}) for seed in range(3)]
            bad = await sample(0, {"X-Priority": "urgent"})
            crowd = await asyncio.gather(*(sample(seed, {}) for seed in range(12)))
            return alone, bad, crowd

        alone, bad, crowd = asyncio.run(scenario())
        served = app.state.registry.models["gray"].engine.stats().requests_completed
    assert [status for status, _ in alone] == [200, 200, 200]
    assert bad[0] == 400  # the header reached the server, which named it
    statuses = sorted(status for status, _ in crowd)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses  # a queue of 1 overflows
    assert served == 3 + statuses.count(200)


def test_the_bulk_client_reports_a_server_that_is_not_there_as_status_0():
    status, seconds = asyncio.run(bulk_http_sample(f"http://127.0.0.1:{free_port()}")(0, {}))
    assert status == 0 and seconds < 5
