"""`pixelcnn bench soak`, briefly, in CI: two real `pixelcnn serve` replicas behind the repository's nginx
gateway, the hostile client mix, decode faults every 29 steps and one replica SIGKILLed and restarted
mid-run; then the same with a planted leak (PIXELCNN_FAULT_LEAK_BYTES_PER_REQUEST), which the report must
flag. The one-hour run's figures are in BENCHMARKS.md."""

from __future__ import annotations

import asyncio
import io
import shutil
import time

import httpx
import pytest
from PIL import Image

from app.bench.load import CUT_BY_KILL, SCENARIOS, Load
from app.bench.soak import RSS_GROWTH_LIMIT, ReplicaProcess, run_soak

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx", path="/usr/sbin:/usr/bin") is None, reason="needs nginx"),
]


def test_a_short_soak_with_a_replica_killed_and_faults_loses_nothing(server_store, tmp_path):
    report = asyncio.run(
        run_soak(
            server_store,
            tmp_path,
            model="gray",
            clients=8,
            duration_s=18,
            warmup_s=5,
            fault_every_steps=29,
            kill_at_s=(6.0,),
            restart_after_s=1.0,
            rss_every_s=1.0,
        )
    )
    assert report["verdict"] == [], report["verdict"]
    assert report["unexpected_errors"] == 0, report["unexpected_examples"]
    assert report["hanging"] == 0
    # The kill happened and the replica came back on its port and served again.
    [kill] = report["kills"]
    assert kill["replica"] == 0 and kill["at_s"] >= 6.0 and kill["ready_after_s"] < 60, kill
    lives = [(p["replica"], p["ended"].split(" at ")[0]) for p in report["processes"]]
    assert lives == [(0, "SIGKILL"), (1, "ran to the end"), (0, "ran to the end")], lives
    assert report["processes"][2]["rss_readings"] >= 1  # the restarted one answers /metrics
    # Faults reached clients and ended their requests at once; every gauge of both replicas is back to 0.
    outcomes = report["by_outcome"]
    assert outcomes.get("injected_fault", 0) > 0 and outcomes.get("200", 0) > 100, outcomes
    assert report["fault_to_end"]["injected_fault"]["max_s"] < 1.0
    assert set(report["all_freed_after_s"]) == {"0", "1"}
    assert all(v is not None for v in report["all_freed_after_s"].values()), report["gauges_at_end"]
    assert all(not p["leak"] for p in report["processes"]), report["processes"]


def test_a_planted_leak_is_flagged_by_the_same_report(server_store, tmp_path):
    report = asyncio.run(
        run_soak(
            server_store,
            tmp_path,
            model="gray",
            clients=8,
            duration_s=10,
            warmup_s=3,
            fault_every_steps=29,
            kill_at_s=(),
            leak_bytes_per_request=256 * 1024,
            rss_every_s=1.0,
        )
    )
    assert report["unexpected_errors"] == 0 and report["hanging"] == 0, report["unexpected_examples"]
    growth = [p["rss_growth_after_warmup"] for p in report["processes"]]
    assert all(g is not None and g > RSS_GROWTH_LIMIT for g in growth), growth
    assert all(p["leak"] for p in report["processes"])
    assert [line.split(":")[0] for line in report["verdict"]] == ["LEAK", "LEAK"], report["verdict"]


def test_outcomes_are_told_apart_and_each_fault_timed():
    """How the report classes what clients saw: a connection cut or a stream without `done` after a kill
    (expected, timed from the kill) vs the same without a kill (unexpected); 503s by type, the gateway's own
    apart; an injected fault timed from the time in its message."""
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, format="PNG")
    load = Load(httpx.AsyncClient(), png.getvalue(), seed=0, scenarios=SCENARIOS, faults=True)
    before_kill = time.perf_counter()
    assert load.record("sample_stream", before_kill, "RemoteProtocolError", "peer closed") == "RemoteProtocolError"
    load.kills.append(time.perf_counter())
    assert load.record("sample_stream", before_kill, "RemoteProtocolError", "peer closed") == CUT_BY_KILL
    assert load.record("stream_slow_reader", before_kill, "stream ended with row", "") == CUT_BY_KILL
    after_kill = time.perf_counter()
    assert load.record("sample_json", after_kill, "ConnectError", "refused") == "ConnectError"
    gateway = '{"error": {"type": "not_ready", "message": "no replica of the server is available right now"}}'
    assert load.record("complete", after_kill, 503, gateway) == "503 no_replica"
    assert load.record("complete", after_kill, 504, '{"error": {"type": "timeout"}}') == "504 timeout"
    fault = f'{{"error": {{"type": "engine_error", "message": "injected decode fault (every 9 steps) at {time.time() - 0.25:.3f}"}}}}'
    assert load.record("sample_json", after_kill, 500, fault) == "injected_fault"
    assert [u.split(":")[1].split()[0] for u in load.unexpected] == ["RemoteProtocolError", "ConnectError"]
    assert len(load.fault_to_end_s[("replica_kill", "sample_stream")]) == 1
    assert len(load.fault_to_end_s[("replica_kill", "stream_slow_reader")]) == 1
    assert 0.24 <= load.fault_to_end_s[("injected_fault", "sample_json")][0] < 1.0


def test_rss_growth_is_judged_on_medians_after_warm_up():
    """A spike in the last reading is not a leak; memory that keeps growing after warm-up is, however
    much it grew during warm-up."""
    mb = 2**20
    steady = [(t, (500 if t % 20 else 530) * mb) for t in range(0, 1205, 5)]  # +6% every 20 s, the last too
    process = ReplicaProcess(replica=0, pid=1, started_s=0, warmup_s=301, rss=[(0, 280 * mb), *steady])
    report = process.report()
    assert report["rss_growth_after_warmup"] == 0 and not report["leak"], report
    assert report["rss_mb"]["start"] == 280 and report["rss_mb"]["max"] == 530
    leaking = ReplicaProcess(0, 1, 0, 300, rss=[(t, (500 + t / 20) * mb) for t in range(0, 1200, 5)])
    assert leaking.report()["leak"] and 0.05 < leaking.report()["rss_growth_after_warmup"] < 0.09
    short = ReplicaProcess(0, 1, 0, 300, rss=[(t, 500 * mb) for t in range(0, 300, 5)])
    assert short.report()["rss_growth_after_warmup"] is None and not short.report()["leak"]
