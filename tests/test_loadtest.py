"""The load tool, briefly, in CI: every scenario (streams read to the end, dropped and read slowly, plain
and PNG samples, completions, likelihoods) against a real server; no unexpected error, every queue
place and decode slot freed afterwards, memory reported."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.bench.load import SCENARIOS, run_load, scrape
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


def test_a_short_soak_with_injected_faults_and_hostile_clients_loses_nothing(server_store):
    """Every 29th decode step fails; clients drop, read and send slowly, and carry deadlines: every request
    ends with an expected answer (the faults' engine_error included), none hangs, and every queue place,
    slot and gauge is back to 0."""
    settings = Settings(model_store=server_store, model="gray", device="cpu", threads=1, fault_every_steps=29)
    app = create_app(settings)
    with torch_threads(torch.get_num_threads()), serve_in_thread(app) as url:
        report = asyncio.run(run_load(url, clients=12, duration_s=6, seed=4, warmup_s=1, faults=True))
        engine = app.state.registry.models["gray"].engine
        stats = engine.stats()
    assert report["unexpected_errors"] == 0, report["unexpected_examples"]
    assert report["hanging"] == 0
    assert report["all_freed_after_s"] is not None, report["gauges_at_end"]
    outcomes = report["outcomes"]
    assert any("injected_fault" in key for key in outcomes), outcomes  # the faults did reach clients
    assert any(key.startswith("likelihood_dropped") for key in outcomes), outcomes
    assert any(key.startswith("slow_sender 200") for key in outcomes), outcomes
    assert any(key.startswith("deadline") for key in outcomes), outcomes
    assert stats.decode_errors > 0 and stats.rows_past_deadline == 0
    assert stats.active_images == 0 and stats.queue_size == 0 and stats.likelihood_in_flight == 0


def test_the_report_reads_the_gauges_of_every_model_and_the_rss_from_metrics():
    text = """# HELP pixelcnn_queue_size requests waiting
# TYPE pixelcnn_queue_size gauge
pixelcnn_queue_size{model="a"} 2.0
pixelcnn_queue_size{model="b } c"} 3.0
# HELP pixelcnn_requests_total requests
# TYPE pixelcnn_requests_total counter
pixelcnn_requests_total{route="/sample"} 7.0
# HELP process_resident_memory_bytes resident memory
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.5e+08
"""
    assert scrape(text) == {"pixelcnn_queue_size": 5.0, "process_resident_memory_bytes": 1.5e8}
