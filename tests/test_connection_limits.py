"""Connection hygiene of a real `pixelcnn serve` (its own protocol guard, no gateway): header size and
count limits (431), head, body and idle timeouts (408 or a close), each counted and logged."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.helpers import start_server

LIMITS = {
    "PIXELCNN_MAX_HEADER_BYTES": "4096",
    "PIXELCNN_MAX_HEADER_COUNT": "20",
    "PIXELCNN_HEADER_TIMEOUT_S": "1",
    "PIXELCNN_BODY_TIMEOUT_S": "1",
    "PIXELCNN_KEEP_ALIVE_TIMEOUT_S": "1",
}


@pytest.fixture(scope="module")
def server(server_store):
    process, url = start_server(server_store, LIMITS)
    yield process, url
    process.terminate()
    process.wait(30)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def status_and_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def send_head(sock: socket.socket, headers: list[tuple[str, str]], method: str = "GET", path: str = "/health") -> None:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in headers)]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())


def test_a_head_over_the_byte_limit_gets_431_before_it_is_read(server):
    _, url = server
    sock = connect(url)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: ")
        for _ in range(64):  # 1 MiB of one header value: the server answers and closes long before the end
            try:
                sock.sendall(b"a" * 16384)
            except (BrokenPipeError, ConnectionResetError):
                break
        status, error = status_and_error(read_all(sock))
    finally:
        sock.close()
    assert status == 431
    assert error["type"] == "headers_too_large" and "4096 bytes" in error["message"]
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_too_many_headers_get_431_and_a_head_within_the_limits_is_served(server):
    _, url = server
    sock = connect(url)
    try:
        send_head(sock, [(f"X-H{i}", "1") for i in range(25)])
        status, error = status_and_error(read_all(sock))
    finally:
        sock.close()
    assert status == 431 and "more than 20 request headers" in error["message"]
    headers = {f"X-H{i}": "v" * 150 for i in range(15)}  # 15 headers, ~2.5 KB: within both limits
    assert httpx.get(f"{url}/health", headers=headers, timeout=5).status_code == 200


def test_a_slow_head_gets_408(server):
    _, url = server
    sock = connect(url)
    try:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: te")  # and nothing more
        response = read_all(sock)
        waited = time.monotonic() - started
    finally:
        sock.close()
    status, error = status_and_error(response)
    assert status == 408 and error["type"] == "request_timeout" and "request head" in error["message"]
    assert 0.9 < waited < 5, waited


def test_an_unfinished_body_gets_408_with_its_request_id_and_is_logged(server):
    process, url = server
    sock = connect(url)
    try:
        send_head(
            sock,
            [("Content-Type", "application/json"), ("Content-Length", "100"), ("X-Request-ID", "slow-body-1")],
            method="POST",
            path="/sample",
        )
        sock.sendall(b'{"n": 1,')  # 8 of the 100 bytes promised
        started = time.monotonic()
        response = read_all(sock)
        waited = time.monotonic() - started
    finally:
        sock.close()
    status, error = status_and_error(response)
    assert status == 408 and "request body" in error["message"] and error["request_id"] == "slow-body-1"
    assert 0.9 < waited < 5, waited
    time.sleep(0.2)
    lines = [
        json.loads(line[line.index("{") :])
        for line in process.log_path.read_text().splitlines()
        if "slow-body-1" in line
    ]
    assert [(line["path"], line["status"]) for line in lines] == [("/sample", 408)]


@pytest.mark.parametrize("first_request", [False, True])
def test_idle_connections_are_closed(server, first_request):
    _, url = server
    sock = connect(url)
    try:
        started = time.monotonic()
        if first_request:
            send_head(sock, [])
        response = read_all(sock)  # the answer if there was a request, then the close
        waited = time.monotonic() - started
    finally:
        sock.close()
    if first_request:
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b'{"status":"ok"}')
    else:
        assert response == b""  # closed without a word
    assert 0.9 < waited < 5, waited


def test_refusals_are_counted(server):
    _, url = server
    sock = connect(url)
    send_head(sock, [(f"X-H{i}", "1") for i in range(25)])
    read_all(sock)
    sock.close()
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'pixelcnn_failures_total{reason="headers_too_large"}' in metrics
    assert 'pixelcnn_requests_total{method="other",route="unmatched",status="431"}' in metrics
