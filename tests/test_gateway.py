"""The gateway without containers: Debian's nginx running the repository's deploy/nginx.conf (rendered for
loopback by app/bench/gateway.py) in front of two real `pixelcnn serve` replicas. Rows of a stream
arrive through it as they are made, both replicas get traffic, a killed replica and a draining one
(503 not_ready) do not fail new requests, and a stream that has started is never sent again to another
replica. Needs nginx (`apt-get install -y nginx`; .ci/run installs it): without it these tests skip and
say so."""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.bench.gateway import Gateway, Replica
from app.model import save
from tests.helpers import tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("nginx") is None and shutil.which("nginx", path="/usr/sbin") is None,
        reason="nginx is not installed (apt-get install -y nginx): the gateway tests need Debian's nginx",
    ),
]

SLOW_ROWS = 256  # the "slow" model's height: a stream of 4 such images takes 0.4-8 s, row by row
SLOW_STREAM = {"model": "slow", "n": 4, "seed": 3, "stream": True}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """'quick' (8x8, the default: answers in milliseconds) and 'slow' (256x256: streams last a while)."""
    store = tmp_path_factory.mktemp("store")
    save(tiny_model("gated", 1, size=8, seed=1).float(), store / "quick")
    save(tiny_model("gated", 1, size=SLOW_ROWS, layers=2, seed=8).float(), store / "slow")
    return store


@pytest.fixture
def replicas(store, tmp_path):
    # On SIGTERM a replica drains for at least the notice (5 s here), whatever else it is doing.
    started = [Replica(store, tmp_path, model="quick", env={"PIXELCNN_SHUTDOWN_NOTICE_S": "5"}) for _ in range(2)]
    try:
        yield [replica.wait_ready() for replica in started]
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture
def gateway(replicas):
    with Gateway([replica.address for replica in replicas]) as running:
        yield running


def sample_requests_answered(replica: Replica) -> int:
    """POST /sample requests the replica answered with 200, from its own /metrics."""
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    pattern = r'^pixelcnn_requests_total\{(?=[^}]*route="/sample")(?=[^}]*status="200")[^}]*\} ([0-9.]+)$'
    return int(sum(float(value) for value in re.findall(pattern, text, flags=re.MULTILINE)))


def active_requests(replica: Replica) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    return sum(
        float(v) for v in re.findall(r"^pixelcnn_engine_active_requests\{[^}]*\} ([0-9.]+)$", text, flags=re.MULTILINE)
    )


def post_all(url: str, count: int, concurrent: int) -> list[httpx.Response]:
    """`count` quick /sample requests through `url`, `concurrent` at a time, each on its own connection."""

    def one(seed: int) -> httpx.Response:
        return httpx.post(f"{url}/sample", json={"n": 1, "seed": seed}, timeout=60)

    with ThreadPoolExecutor(concurrent) as pool:
        return list(pool.map(one, range(count)))


class Stream(threading.Thread):
    """A streamed /sample of the slow model, read in the background: (event, seconds since start) pairs,
    and how the stream ended (None, or the error that cut it)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.events, self.ended_by = url, [], None
        self.first_row = threading.Event()

    def run(self) -> None:
        started = time.perf_counter()
        try:
            with httpx.stream("POST", f"{self.url}/sample", json=SLOW_STREAM, timeout=120) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        self.events.append((line[7:], time.perf_counter() - started))
                        if line == "event: row":
                            self.first_row.set()
        except httpx.HTTPError as error:
            self.ended_by = error

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def test_rows_arrive_through_the_gateway_as_they_are_made(replicas, gateway):
    stream = Stream(gateway.url)
    stream.start()
    assert stream.first_row.wait(30)
    # Buffered by nginx, no row would reach the client before the replica had finished the request.
    running = [active_requests(replica) for replica in replicas]
    stream.join(120)
    assert stream.ended_by is None
    assert stream.names() == ["row"] * SLOW_ROWS + ["done"]
    assert sum(running) == 1, running
    first_row_s, done_s = stream.events[0][1], stream.events[-1][1]
    assert first_row_s < done_s / 4, (first_row_s, done_s)


def test_both_replicas_receive_traffic(replicas, gateway):
    responses = post_all(gateway.url, count=12, concurrent=6)
    assert [r.status_code for r in responses] == [200] * 12
    answered = [sample_requests_answered(replica) for replica in replicas]
    assert sum(answered) == 12 and min(answered) >= 1, answered
    # The gateway's own log names the replica of every request (its log_format), and saw both.
    upstreams = {re.search(r"upstream=(\S+)", line)[1] for line in gateway.log_lines() if "POST /sample" in line}
    assert upstreams == {replica.address for replica in replicas}


def test_a_killed_replica_does_not_fail_new_requests(replicas, gateway):
    alive, killed = replicas
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait(10)
    responses = post_all(gateway.url, count=4, concurrent=1) + post_all(gateway.url, count=8, concurrent=4)
    assert [r.status_code for r in responses] == [200] * 12
    assert sample_requests_answered(alive) == 12
    # least_conn sends the next request to the dead replica (it has no open connection): nginx gets a
    # connection error there (logged as 502) and passes the request on, then marks the replica failed.
    retried = [line for line in gateway.log_lines() if f"upstream={killed.address}, {alive.address}" in line]
    assert retried and all("upstream_status=502, 200" in line for line in retried), gateway.log_lines()


def test_a_draining_replica_answers_503_and_the_gateway_retries_elsewhere(replicas, gateway):
    draining, other = replicas
    draining.process.send_signal(signal.SIGTERM)  # draining for the 5 s notice: 503 not_ready, still listening
    deadline = time.monotonic() + 10
    while httpx.get(f"{draining.url}/ready", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "the replica did not start draining"
        time.sleep(0.02)
    responses = post_all(gateway.url, count=6, concurrent=1)
    assert draining.process.poll() is None, "the drain ended before the requests were sent: nothing was tested"
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert sample_requests_answered(other) == 6
    retried = [line for line in gateway.log_lines() if f"upstream={draining.address}, {other.address}" in line]
    assert retried and all("upstream_status=503, 200" in line for line in retried), gateway.log_lines()
    assert draining.process.wait(30) == 0


def test_a_missed_deadline_is_a_504_that_the_gateway_neither_retries_nor_counts_against_the_replica(replicas, gateway):
    """A request whose own X-Request-Timeout passes gets 504 `timeout`: one try (a retry elsewhere would
    start a fresh deadline), and however many there are, no replica is taken out of the pool for them."""
    late = [
        httpx.post(
            f"{gateway.url}/sample",
            json={"model": "slow", "n": 4, "seed": k},
            headers={"X-Request-Timeout": "0.05"},
            timeout=60,
        )
        for k in range(4)
    ]
    assert [(r.status_code, r.json()["error"]["type"]) for r in late] == [(504, "timeout")] * 4, [r.text for r in late]
    tried = [line.split("upstream=")[1].split()[0] for line in gateway.log_lines() if '"POST /sample' in line]
    assert len(tried) == 4 and not any(address.endswith(",") for address in tried), gateway.log_lines()  # one each
    # Four misses in well under 5 s would have taken both replicas out (max_fails=2) had they counted.
    responses = post_all(gateway.url, count=4, concurrent=1)
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert sum(sample_requests_answered(replica) for replica in replicas) == 4


def test_a_started_stream_is_not_sent_to_another_replica(replicas, gateway):
    stream = Stream(gateway.url)
    stream.start()
    assert stream.first_row.wait(30)
    serving = [replica for replica in replicas if active_requests(replica) > 0]
    assert len(serving) == 1, [active_requests(replica) for replica in replicas]
    other = next(replica for replica in replicas if replica is not serving[0])
    serving[0].process.send_signal(signal.SIGKILL)
    stream.join(60)
    assert not stream.is_alive()
    # The 200 and some rows were out: nginx cannot start over elsewhere, it cuts the client's stream.
    assert "done" not in stream.names() and 0 < len(stream.names()) < SLOW_ROWS, stream.names()[-3:]
    assert isinstance(stream.ended_by, httpx.RemoteProtocolError), stream.ended_by
    assert active_requests(other) == 0 and sample_requests_answered(other) == 0
    (line,) = [line for line in gateway.log_lines() if "POST /sample" in line]
    assert f"upstream={serving[0].address} " in line, line  # one replica tried, no retry


def test_rendered_config_is_the_shipped_one_but_for_addresses_and_paths(tmp_path):
    from app.bench.gateway import NGINX_CONF, render_gateway_config

    shipped = NGINX_CONF.read_text()
    rendered = render_gateway_config(shipped, ["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3", tmp_path)
    changed = [line.strip() for line in set(rendered.splitlines()) - set(shipped.splitlines())]
    assert sorted(changed) == sorted(
        [
            f"pid {tmp_path}/nginx.pid;",
            f"error_log {tmp_path}/error.log warn;",
            f"access_log {tmp_path}/access.log gateway;",
            "listen 127.0.0.1:3;",
            "server 127.0.0.1:1 max_fails=2 fail_timeout=5s;",
            "server 127.0.0.1:2 max_fails=2 fail_timeout=5s;",
            *(f"{kind}_temp_path {tmp_path}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        ]
    )
    with pytest.raises(ValueError, match="server pixelcnn:8000"):
        render_gateway_config(shipped.replace("server pixelcnn:8000", "server other:8000"), ["a:1"], "b:2", tmp_path)


def test_gateway_answers_in_the_servers_error_format_when_no_replica_runs(replicas):
    for replica in replicas:
        replica.stop()
    with Gateway([replica.address for replica in replicas]) as gateway:
        response = httpx.post(f"{gateway.url}/sample", json={"n": 1}, timeout=30)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert json.loads(response.text)["error"]["type"] == "not_ready"
