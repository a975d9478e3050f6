"""Priorities under overload: high-priority latency while low-priority requests arrive at twice what the
server can serve, against a real `pixelcnn serve`.

    pixelcnn bench priority [--store model_store] [--seconds 30] [--overload 2] [--json]

With --engine, the same against the engine in this process, without HTTP (what the scheduler does,
apart from the event loop's and the client's share of the CPU).

1. capacity: /sample n=1 requests, --concurrency at a time for --capacity-s: requests/s served;
2. unloaded: high-priority (X-Priority: high) requests one after another: their latency;
3. overload: low-priority requests arriving at --overload x capacity (open loop, each with
   X-Request-Timeout --low-timeout-s, as clients that give up would; over HTTP from a process of their
   own, as other clients), and a high-priority request every --high-every-s, for --seconds. Reports
   high-priority p50/p99 against the unloaded ones, low-priority outcomes by status, and the engine's
   requests_expired and rows_past_deadline counters from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from multiprocessing.queues import Queue
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.bench.gateway import Replica
from app.engine import DeadlineExceededError, Engine, GenerationRequest, QueueFullError, set_cpu_threads
from app.model import load

# (seed, headers) -> (HTTP status or its equivalent, seconds): one /sample of one image
Sample = Callable[[int, dict[str, str]], Awaitable[tuple[int, float]]]
PRIORITIES = {"low": 0, "normal": 1, "high": 2}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def http_sample(client: httpx.AsyncClient) -> Sample:
    async def sample(seed: int, headers: dict[str, str]) -> tuple[int, float]:
        """Status 0 when the connection failed (counted apart in the outcomes)."""
        started = time.perf_counter()
        try:
            response = await client.post("/sample", json={"n": 1, "seed": seed}, headers=headers)
        except httpx.TransportError:
            return 0, time.perf_counter() - started
        return response.status_code, time.perf_counter() - started

    return sample


def bulk_http_sample(url: str) -> Sample:
    """The same request by a bare HTTP/1.1 client on asyncio streams, with a pool of keep-alive
    connections: for the bulk flood, which runs hundreds of requests a second, a small fraction of what
    httpx costs per request (both share the server's two cores here; real bulk clients are elsewhere)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
        """Send a request and read its answer (Content-Length framed): (status, connection kept open)."""
        writer.write(request)
        status = int((await reader.readline()).split()[1])
        length, keep = 0, True
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            elif name.strip().lower() == "connection" and "close" in value.lower():
                keep = False
        await reader.readexactly(length)
        return status, keep

    async def sample(seed: int, headers: dict[str, str]) -> tuple[int, float]:
        """Status 0 when the connection failed (counted apart in the outcomes)."""
        body = json.dumps({"n": 1, "seed": seed}).encode()
        lines = ["POST /sample HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
        lines += [f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in headers.items())]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        started = time.perf_counter()
        while True:
            reused = bool(idle)  # a kept connection the server may have closed meanwhile: then a new one
            writer = None
            try:
                reader, writer = idle.pop() if reused else await asyncio.open_connection(host, port)
                status, keep = await exchange(reader, writer, request)
                break
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                if writer is not None:
                    writer.close()
                if not reused:
                    return 0, time.perf_counter() - started
        if keep:
            idle.append((reader, writer))
        else:
            writer.close()
        return status, time.perf_counter() - started

    return sample


def engine_sample(engine: Engine) -> Sample:
    async def sample(seed: int, headers: dict[str, str]) -> tuple[int, float]:
        started = time.perf_counter()
        timeout = headers.get("x-request-timeout")
        request = GenerationRequest(
            n=1,
            seed=seed,
            priority=PRIORITIES[headers.get("x-priority", "normal")],
            deadline=None if timeout is None else time.monotonic() + float(timeout),
        )
        try:
            await engine.generate(request)
        except QueueFullError:
            return 503, time.perf_counter() - started
        except DeadlineExceededError:
            return 504, time.perf_counter() - started
        return 200, time.perf_counter() - started

    return sample


async def capacity(sample: Sample, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        seed = k * 100000
        while time.perf_counter() < stop:
            status, _ = await sample(seed, {})
            done += status == 200
            seed += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.perf_counter() - started)


async def unloaded(sample: Sample, count: int) -> list[float]:
    latencies = []
    for seed in range(count):
        status, seconds = await sample(seed, {"x-priority": "high"})
        assert status == 200, status
        latencies.append(seconds)
    return latencies


async def open_loop(sample: Sample, rate: float, seconds: float, low_timeout_s: float) -> Counter[int]:
    """Low-priority requests arriving at `rate` per second for `seconds`, each giving up after
    `low_timeout_s` (X-Request-Timeout), as clients that give up would: their outcomes by status."""
    outcomes: Counter[int] = Counter()
    headers = {"x-priority": "low", "x-request-timeout": str(low_timeout_s)}

    async def low(seed: int) -> None:
        status, _ = await sample(seed, headers)
        outcomes[status] += 1

    tasks: list[asyncio.Task] = []
    started = time.perf_counter()
    seed = 0
    while (now := time.perf_counter()) < started + seconds:
        tasks.append(asyncio.create_task(low(seed)))
        seed += 1
        await asyncio.sleep(max(0.0, started + seed / rate - now))
    await asyncio.gather(*tasks)
    return outcomes


async def probes(sample: Sample, every_s: float, seconds: float) -> tuple[list[float], Counter[int]]:
    """A high-priority request every `every_s` for `seconds` (the first after 1 s): the latencies of
    those answered 200, and the outcomes by status."""
    outcomes: Counter[int] = Counter()
    latencies: list[float] = []

    async def high(seed: int) -> None:
        status, latency = await sample(seed, {"x-priority": "high"})
        outcomes[status] += 1
        if status == 200:
            latencies.append(latency)

    tasks: list[asyncio.Task] = []
    started = time.perf_counter()
    while (at := 1.0 + len(tasks) * every_s) < seconds:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        tasks.append(asyncio.create_task(high(10**6 + len(tasks))))
    await asyncio.gather(*tasks)
    return latencies, outcomes


def flood_process(url: str, rate: float, seconds: float, low_timeout_s: float, results: Queue) -> None:
    """open_loop over HTTP in a process of its own: the bulk clients are not the high-priority one, and
    a client loop busy sending them would delay (and mis-time) its requests. Puts None once it has
    started (its imports done: they take a core for a second or two), then the outcomes."""

    async def flood() -> Counter[int]:
        return await open_loop(bulk_http_sample(url), rate, seconds, low_timeout_s)

    results.put(None)
    results.put(dict(asyncio.run(flood())))


def client_for(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    return httpx.AsyncClient(base_url=url, timeout=300, limits=limits)


def engine_counters(url: str) -> dict[str, float]:
    wanted = ("pixelcnn_engine_requests_expired", "pixelcnn_engine_rows_past_deadline")
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name in wanted:
            found[family.name.removeprefix("pixelcnn_engine_")] = sum(s.value for s in family.samples)
    return found


Overload = Callable[[float, argparse.Namespace], Awaitable[tuple[list[float], Counter[int], Counter[int]]]]


async def measure(sample: Sample, overload: Overload, args: argparse.Namespace) -> dict:
    await unloaded(sample, 5)  # warm-up
    served_per_s = await capacity(sample, args.concurrency, args.capacity_s)
    alone = await unloaded(sample, args.unloaded)
    loaded, low_outcomes, high_outcomes = await overload(args.overload * served_per_s, args)
    unloaded_p99 = percentile(alone, 0.99)
    loaded_p99 = percentile(loaded, 0.99)
    return {
        "capacity_requests_per_s": round(served_per_s, 2),
        "low_arrivals_per_s": round(args.overload * served_per_s, 2),
        "low_sent_per_s": round(sum(low_outcomes.values()) / args.seconds, 2),
        "unloaded_high_p50_ms": round(1000 * statistics.median(alone), 1),
        "unloaded_high_p99_ms": round(1000 * unloaded_p99, 1),
        "overload_high_p50_ms": round(1000 * statistics.median(loaded), 1),
        "overload_high_p99_ms": round(1000 * loaded_p99, 1),
        "p99_ratio": round(loaded_p99 / unloaded_p99, 2),
        "high_outcomes": dict(high_outcomes),
        "low_outcomes": dict(low_outcomes),
    }


async def over_http(url: str, args: argparse.Namespace) -> dict:
    async with client_for(url) as client:
        sample = http_sample(client)

        async def overload(rate: float, args: argparse.Namespace) -> tuple[list[float], Counter[int], Counter[int]]:
            spawn = multiprocessing.get_context("spawn")
            results: Queue = spawn.Queue()
            flood = spawn.Process(target=flood_process, args=(url, rate, args.seconds, args.low_timeout_s, results))
            flood.start()
            try:
                await asyncio.to_thread(results.get, timeout=120)  # started: the probes' clock starts now
                latencies, high_outcomes = await probes(sample, args.high_every_s, args.seconds)
                low_outcomes = await asyncio.to_thread(results.get, timeout=args.seconds + args.low_timeout_s + 120)
            finally:
                flood.join(timeout=10)
            return latencies, Counter(low_outcomes), high_outcomes

        result = await measure(sample, overload, args)
    return {**result, **engine_counters(url)}


async def in_process(args: argparse.Namespace) -> dict:
    set_cpu_threads(1)
    engine = Engine(load(args.store / args.model).float(), lanes=1, step_images=args.step_images)
    await engine.start()
    sample = engine_sample(engine)

    async def overload(rate: float, args: argparse.Namespace) -> tuple[list[float], Counter[int], Counter[int]]:
        low_outcomes, (latencies, high_outcomes) = await asyncio.gather(
            open_loop(sample, rate, args.seconds, args.low_timeout_s), probes(sample, args.high_every_s, args.seconds)
        )
        return latencies, low_outcomes, high_outcomes

    try:
        result = await measure(sample, overload, args)
        stats = engine.stats()
    finally:
        await engine.stop()
    return {**result, "requests_expired": stats.requests_expired, "rows_past_deadline": stats.rows_past_deadline}


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench priority", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"), help="model store the server serves")
    parser.add_argument("--model", default="fashion-mnist", help="model to sample (default fashion-mnist)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests at a time while measuring capacity")
    parser.add_argument("--capacity-s", type=float, default=10.0, help="seconds of the capacity measurement")
    parser.add_argument("--unloaded", type=int, default=40, help="high-priority requests timed alone")
    parser.add_argument("--overload", type=float, default=2.0, help="low-priority arrivals as a multiple of capacity")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the overload phase")
    parser.add_argument("--high-every-s", type=float, default=0.5, help="one high-priority request this often")
    parser.add_argument(
        "--low-timeout-s", type=float, default=5.0, help="X-Request-Timeout of the low-priority requests"
    )
    parser.add_argument(
        "--step-images", type=int, help="images per decode step (PIXELCNN_STEP_IMAGES; default: the server's)"
    )
    parser.add_argument("--engine", action="store_true", help="the engine in this process, no HTTP")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.engine:
        result = asyncio.run(in_process(args))
    else:
        env = {} if args.step_images is None else {"PIXELCNN_STEP_IMAGES": str(args.step_images)}
        workdir = Path(tempfile.mkdtemp(prefix="pixelcnn-priority-"))
        replica = Replica(args.store, workdir, model=args.model, env=env)
        try:
            replica.wait_ready(180)
            result = asyncio.run(over_http(replica.url, args))
        finally:
            replica.stop()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<28} {value}")
    return 0
