"""Hostile clients against a real `pixelcnn serve`: /health latency while one client sends huge headers or
many clients send their headers a byte at a time (slow-loris).

    pixelcnn bench hostile [--store model_store] [--probes 300] [--slowloris 50] [--header-mb 80] [--json]

Scenarios, each measured by a health checker probing /health on one keep-alive connection every
--interval-ms: `quiet` (nobody else), `big-header` (a client sending a --header-mb MB header, again as soon
as the server cuts it), `slowloris` (--slowloris connections each sending one byte of a request head per
second, reconnecting when closed). Prints a table and, with --json, the numbers as JSON. --server-pythonpath
runs the server from another checkout (PYTHONPATH), to compare before and after a change.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from app.bench.gateway import Replica


class Attacker(threading.Thread):
    """Runs `attack(stop)` over and over until stopped, counting the attempts."""

    def __init__(self, attack: Callable[[threading.Event], None]) -> None:
        super().__init__(daemon=True)
        self.attack = attack
        self.stop = threading.Event()
        self.attempts = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.attempts += 1
            try:
                self.attack(self.stop)
            except OSError:
                time.sleep(0.01)  # cut by the server: try again


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=30)


def big_header(address: tuple[str, int], megabytes: int) -> Callable[[threading.Event], None]:
    chunk = b"a" * 65536

    def attack(stop: threading.Event) -> None:
        with connect(address) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\nX-Big: ")
            for _ in range(megabytes * 16):
                if stop.is_set():
                    return
                sock.sendall(chunk)
            sock.sendall(b"\r\n\r\n")
            sock.recv(65536)

    return attack


def slow_head(address: tuple[str, int]) -> Callable[[threading.Event], None]:
    head = b"GET /health HTTP/1.1\r\nHost: bench\r\n" + b"X-Slow: " + b"a" * 4000 + b"\r\n\r\n"

    def attack(stop: threading.Event) -> None:
        with connect(address) as sock:
            for byte in head:
                if stop.wait(1.0):
                    return
                sock.sendall(bytes([byte]))
            sock.recv(65536)

    return attack


def probe(url: str, probes: int, interval_s: float) -> list[float]:
    """/health latencies in seconds, one keep-alive connection (a new one if the server closed it)."""
    latencies = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(probes):
            started = time.perf_counter()
            response = client.get("/health")
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"/health answered {response.status_code}")
            time.sleep(interval_s)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def scenario(url: str, attackers: list[Attacker], probes: int, interval_s: float) -> dict:
    for attacker in attackers:
        attacker.start()
    time.sleep(1.0 if attackers else 0)  # the attack is under way before the first probe
    try:
        latencies = probe(url, probes, interval_s)
    finally:
        for attacker in attackers:
            attacker.stop.set()
    ms = [1000 * value for value in latencies]
    return {
        "probes": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2),
        "attacker_connections": sum(attacker.attempts for attacker in attackers),
    }


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench hostile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"), help="model store the server serves")
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--slowloris", type=int, default=50, help="slow-loris connections")
    parser.add_argument("--header-mb", type=int, default=80, help="size of the big header")
    parser.add_argument("--server-pythonpath", help="PYTHONPATH of the server (another checkout)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    env = {"PYTHONPATH": args.server_pythonpath} if args.server_pythonpath else None
    replica = Replica(args.store, Path(tempfile.mkdtemp(prefix="pixelcnn-hostile-")), env=env)
    try:
        replica.wait_ready(180)
        address = ("127.0.0.1", replica.port)
        interval_s = args.interval_ms / 1000
        results = {
            "quiet": scenario(replica.url, [], args.probes, interval_s),
            "big-header": scenario(
                replica.url, [Attacker(big_header(address, args.header_mb))], args.probes, interval_s
            ),
            "slowloris": scenario(
                replica.url, [Attacker(slow_head(address)) for _ in range(args.slowloris)], args.probes, interval_s
            ),
        }
    finally:
        replica.stop()
    print(f"{'scenario':<12} {'probes':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'attacker conns':>15}")
    for name, r in results.items():
        print(
            f"{name:<12} {r['probes']:>6} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8} "
            f"{r['attacker_connections']:>15}"
        )
    if args.json:
        print(json.dumps(results))
    return 0
