"""The load tool, briefly, in CI: every scenario (streams read to the end, dropped and read slowly, plain
and PNG samples, completions, likelihoods) against a real server; no unexpected error, every queue
place and decode slot freed afterwards, memory reported."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.bench.load import SCENARIOS, run_load
from app.bench.servers import serve_in_thread
from app.server import Settings, create_app
from tests.helpers import torch_threads

pytestmark = pytest.mark.slow


def test_a_short_mixed_load_ends_clean(server_store):
    app = create_app(Settings(model_store=server_store, model="gray", device="cpu", threads=1))
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url:
        report = asyncio.run(run_load(url, clients=12, duration_s=4, seed=3, warmup_s=1))
    assert report["unexpected_errors"] == 0, report["unexpected_examples"]
    assert report["all_freed_after_s"] is not None, report["gauges_at_end"]
    assert set(report["routes"]) == set(SCENARIOS), report["routes"]  # every scenario ran
    assert report["rss_bytes"]["end"] > 0 and report["requests"] > 20
