"""SIGTERM to a real `pixelcnn serve` with streams open: /ready turns 503 at once and new work is refused,
running requests finish (within PIXELCNN_SHUTDOWN_TIMEOUT_S), what is still running after that ends
with an `error` event naming the shutdown, and the process exits 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.model import save
from tests.helpers import start_server, tiny_model

pytestmark = pytest.mark.slow

SIZE = 160  # the slow model's height and width: one image takes seconds even by wavefront on two cores


@pytest.fixture(scope="module")
def slow_store(tmp_path_factory) -> Path:
    """One model whose images take seconds to draw (SIZE x SIZE), so streams are open when the signal comes."""
    store = tmp_path_factory.mktemp("store")
    save(tiny_model("gated", 1, size=SIZE, layers=4, seed=8, hidden_channels=192).float(), store / "slow")
    return store


class OpenStream(threading.Thread):
    """A streamed /sample read in the background: its event names, the last event's data, and whether the
    connection was cut before the stream's end (`cut`)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.events, self.first_row = url, [], threading.Event()
        self.cut = False

    def run(self) -> None:
        body = {"n": 1, "seed": 1, "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/sample", json=body, timeout=120) as response:
                name = None
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        self.events.append((name, json.loads(line[6:])))
                        if name == "row":
                            self.first_row.set()
        except httpx.TransportError:
            self.cut = True


@pytest.mark.parametrize("timeout_s, ending", [(60.0, "done"), (0.5, "error")])
def test_sigterm_drains_then_exits_zero(slow_store, timeout_s, ending):
    process, url = start_server(
        slow_store, {"PIXELCNN_SHUTDOWN_TIMEOUT_S": str(timeout_s), "PIXELCNN_SHUTDOWN_NOTICE_S": "0.3"}
    )
    try:
        stream = OpenStream(url)
        stream.start()
        assert stream.first_row.wait(30), "the stream never started"
        process.send_signal(signal.SIGTERM)
        rows_at_signal = len(stream.events)
        time.sleep(0.1)
        ready = httpx.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503 and "shutting down" in ready.json()["reason"]
        refused = httpx.post(f"{url}/sample", json={"n": 1}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
        assert "shutting down" in refused.json()["error"]["message"]
        stream.join(120)
        assert not stream.is_alive()
        name, data = stream.events[-1]
        assert name == ending, stream.events[-1]
        assert rows_at_signal < SIZE - 5  # the image was far from finished when the signal came
        if ending == "done":
            assert len(stream.events) == SIZE + 1  # every row, then the result
        if ending == "error":
            assert data["error"]["type"] == "not_ready" and "shutting down" in data["error"]["message"]
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.log_path.read_text()
    assert "draining" in output, output


def hostile_connections(url: str) -> list[socket.socket]:
    """A half-sent head, a half-sent body, an idle keep-alive and a stream whose client reads nothing."""
    host, port = url.removeprefix("http://").split(":")

    def connect(receive_buffer: int | None = None) -> socket.socket:
        sock = socket.socket()
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect((host, int(port)))
        return sock

    half_head, half_body, idle, stalled = connect(), connect(), connect(), connect(receive_buffer=4096)
    half_head.sendall(b"GET /health HTTP/1.1\r\nHost: t")
    half_body.sendall(
        b"POST /sample HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{"
    )
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    body = json.dumps({"n": 8, "seed": 1, "stream": True}).encode()  # ~300 KB of row events
    stalled.sendall(
        b"POST /sample HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return [half_head, half_body, idle, stalled]


@pytest.mark.timeout(120)
def test_shutdown_finishes_whatever_the_clients_do(slow_store):
    """Slow or silent clients cannot hold the process: it exits 0 within the drain plus a few seconds,
    and a stream that is read gets its error event."""
    slow = {
        "PIXELCNN_HEADER_TIMEOUT_S": "300",
        "PIXELCNN_BODY_TIMEOUT_S": "300",
        "PIXELCNN_KEEP_ALIVE_TIMEOUT_S": "300",
    }
    env = {"PIXELCNN_SHUTDOWN_TIMEOUT_S": "1", "PIXELCNN_SHUTDOWN_NOTICE_S": "0.3", **slow}
    process, url = start_server(slow_store, env)
    sockets = []
    try:
        stream = OpenStream(url)
        stream.start()
        sockets = hostile_connections(url)
        assert stream.first_row.wait(30), "the stream never started"
        time.sleep(1)  # the stalled stream fills its socket buffers
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        took = time.monotonic() - signalled
        stream.join(10)
        name, data = stream.events[-1]
        assert name == "error" and "shutting down" in data["error"]["message"]
    finally:
        for sock in sockets:
            sock.close()
        if process.poll() is None:
            process.kill()
    assert took < 1 + 5, f"shutdown took {took:.1f} s:\n{process.log_path.read_text()[-3000:]}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once(slow_store, second):
    process, url = start_server(slow_store, {"PIXELCNN_SHUTDOWN_TIMEOUT_S": "60", "PIXELCNN_SHUTDOWN_NOTICE_S": "0.3"})
    try:
        stream = OpenStream(url)
        stream.start()
        assert stream.first_row.wait(30), "the stream never started"
        process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert process.poll() is None  # draining: the stream may take 60 s to finish
        signalled = time.monotonic()
        process.send_signal(second)
        assert process.wait(20) == 0
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    assert took < 3, f"stopping took {took:.1f} s:\n{process.log_path.read_text()[-3000:]}"
    stream.join(10)
    assert not stream.is_alive() and "done" not in [name for name, _ in stream.events]  # stopped, not finished
    assert stream.cut or stream.events[-1][0] == "error", stream.events[-1:]
