"""Load and soak: `pixelcnn bench load --url URL [--clients 64] [--duration 600] [--json]`.

N concurrent clients (asyncio tasks over httpx, loopback only) each loop over a weighted mix until the
duration is up: streamed /sample (read to the end), plain /sample as JSON or PNG, /complete (multipart),
/likelihood (multipart), streams dropped after their first row, and streams read slowly. It reports
throughput, p50/p99 latency per scenario, outcomes by status, the server's resident memory (from
/metrics) after warm-up and at the end, and whether every queue place and decode slot was freed after
the run (queue size, active images, active requests back to 0 within 10 s). Any 5xx, or a status that a
scenario does not expect, counts as an unexpected error; 503 `overloaded` is an expected answer to load,
503 `timeout` to a request with a deadline, and with --faults (a server run with
PIXELCNN_FAULT_EVERY_STEPS) 500 `engine_error` or a stream's `error` event of that type, counted as
`injected_fault`. A request not finished 60 s after the duration is `hanging` (cancelled, and reported).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator

import httpx
from PIL import Image

SCENARIOS = {  # name: weight
    "sample_stream": 30,
    "sample_json": 15,
    "sample_png": 5,
    "complete": 15,
    "likelihood": 15,
    "stream_dropped": 10,
    "stream_slow_reader": 10,
    "likelihood_dropped": 5,  # the client leaves 50 ms after sending
    "slow_sender": 5,  # the JSON body sent in pieces, 20 ms apart
    "deadline": 10,  # X-Request-Timeout of 0.05-2 s: 200, or 503 `timeout`
}
# 503: overloaded (Retry-After) or timeout (a deadline); answers the server may give under load
EXPECTED = {200, 503, "injected_fault", "dropped"}
GAUGES = ("pixelcnn_queue_size", "pixelcnn_active_images", "pixelcnn_engine_active_requests")


def scrape(text: str) -> dict[str, float]:
    """The few /metrics values the report needs: RSS, and the sums over models of the gauges."""
    values: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match and (match[1] in GAUGES or match[1] == "process_resident_memory_bytes"):
            values[match[1]] += float(match[2])
    return dict(values)


class Load:
    def __init__(
        self, client: httpx.AsyncClient, image_png: bytes, seed: int, scenarios: dict[str, int], faults: bool = False
    ) -> None:
        self.client = client
        self.faults = faults  # the server injects decode faults: engine_error answers are expected
        self.scenarios = scenarios
        self.image_png = image_png
        self.height = Image.open(io.BytesIO(image_png)).height
        self.rng = random.Random(seed)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.unexpected: list[str] = []

    def record(self, scenario: str, started: float, status: int | str, detail: str = "") -> None:
        if self.faults and (status == 500 or status == "stream ended with error") and "engine_error" in detail:
            status = "injected_fault"
        self.latency[scenario].append(time.perf_counter() - started)
        self.outcomes[(scenario, str(status))] += 1
        if status not in EXPECTED:
            self.unexpected.append(f"{scenario}: {status} {detail[:200]}")

    async def one(self, scenario: str) -> None:
        body = {
            "n": self.rng.choice([1, 1, 2, 4]),
            "seed": self.rng.randrange(2**31),
            "temperature": self.rng.choice([0.8, 1.0, 1.2]),
        }
        started = time.perf_counter()
        try:
            if scenario.startswith("sample_stream") or scenario.startswith("stream_"):
                await self.stream(scenario, {**body, "stream": True}, started)
                return
            if scenario == "sample_json":
                response = await self.client.post("/sample", json=body)
            elif scenario == "sample_png":
                response = await self.client.post("/sample", json=body, headers={"Accept": "image/png"})
            elif scenario == "deadline":
                timeout = str(round(self.rng.uniform(0.05, 2.0), 3))
                response = await self.client.post("/sample", json=body, headers={"X-Request-Timeout": timeout})
            elif scenario == "slow_sender":
                payload = json.dumps(body).encode()

                async def pieces() -> AsyncIterator[bytes]:
                    for k in range(0, len(payload), 8):
                        await asyncio.sleep(0.02)
                        yield payload[k : k + 8]

                headers = {"Content-Type": "application/json", "Content-Length": str(len(payload))}
                response = await self.client.post("/sample", content=pieces(), headers=headers)
            elif scenario == "likelihood_dropped":
                files = [("image", (f"{k}.png", self.image_png, "image/png")) for k in range(body["n"])]
                try:
                    response = await asyncio.wait_for(self.client.post("/likelihood", files=files), 0.05)
                except TimeoutError:
                    self.record(scenario, started, "dropped")
                    return
            elif scenario == "complete":
                files = {"image": ("top.png", self.image_png, "image/png")}
                data = {"n": str(body["n"]), "seed": str(body["seed"]), "rows": str(self.rng.randrange(1, self.height))}
                response = await self.client.post("/complete", files=files, data=data)
            else:
                files = [("image", (f"{k}.png", self.image_png, "image/png")) for k in range(body["n"])]
                response = await self.client.post("/likelihood", files=files)
            self.record(scenario, started, response.status_code, response.text if response.status_code >= 400 else "")
        except httpx.HTTPError as error:
            self.record(scenario, started, type(error).__name__, str(error))

    async def stream(self, scenario: str, body: dict, started: float) -> None:
        async with self.client.stream("POST", "/sample", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                self.record(scenario, started, response.status_code, response.text)
                return
            last_event, last_data = None, ""
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    last_data = line
                if line.startswith("event: "):
                    last_event = line[7:]
                    if scenario == "stream_dropped" and last_event == "row":
                        self.record(scenario, started, 200)
                        return  # leaving the block closes the connection mid-stream
                elif scenario == "stream_slow_reader":
                    await asyncio.sleep(0.05)
            if last_event == "done":
                self.record(scenario, started, 200)
            else:
                self.record(scenario, started, f"stream ended with {last_event}", last_data)

    async def client_loop(self, deadline: float) -> None:
        names, weights = list(self.scenarios), list(self.scenarios.values())
        while time.perf_counter() < deadline:
            await self.one(self.rng.choices(names, weights)[0])


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    return scrape((await client.get("/metrics")).text)


async def run_load(
    url: str,
    clients: int,
    duration_s: float,
    seed: int,
    warmup_s: float,
    scenarios: dict[str, int] | None = None,
    faults: bool = False,
) -> dict:
    """`scenarios`: a subset of SCENARIOS (name: weight); all of them by default. `faults`: the server
    injects decode faults (PIXELCNN_FAULT_EVERY_STEPS), so engine_error answers are expected."""
    scenarios = scenarios or SCENARIOS
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        for _ in range(10):  # the image the scenarios send; with injected faults, a try may fail
            first = await client.post("/sample", json={"n": 1, "seed": seed}, headers={"Accept": "image/png"})
            if first.status_code == 200 or not faults:
                break
        first.raise_for_status()
        load = Load(client, first.content, seed, scenarios, faults)
        at_start = await metrics(client)
        started = time.perf_counter()
        deadline = started + duration_s
        workers = [asyncio.create_task(load.client_loop(deadline)) for _ in range(clients)]
        await asyncio.sleep(min(warmup_s, duration_s))
        after_warmup = await metrics(client)
        _, hanging = await asyncio.wait(workers, timeout=duration_s + 60)
        for worker in hanging:  # a request that never ended: reported, then given up
            worker.cancel()
        elapsed = time.perf_counter() - started
        at_end = await metrics(client)
        freed_after_s = None
        for waited in range(100):
            now = await metrics(client)
            if all(now.get(g, 0) == 0 for g in GAUGES):
                freed_after_s = waited * 0.1
                break
            await asyncio.sleep(0.1)
    completed = sum(len(v) for v in load.latency.values())
    rss = {
        k: v.get("process_resident_memory_bytes")
        for k, v in (("start", at_start), ("after_warmup", after_warmup), ("end", at_end))
    }
    growth = (rss["end"] / rss["after_warmup"] - 1) if rss["end"] and rss["after_warmup"] else None
    return {
        "url": url,
        "clients": clients,
        "duration_s": round(elapsed, 1),
        "requests": completed,
        "requests_per_s": round(completed / elapsed, 2),
        "routes": {
            name: {
                "count": len(v),
                "p50_s": round(statistics.median(v), 3),
                "p99_s": round(sorted(v)[min(len(v) - 1, int(0.99 * len(v)))], 3),
            }
            for name, v in sorted(load.latency.items())
        },
        "outcomes": {f"{s} {status}": n for (s, status), n in sorted(load.outcomes.items())},
        "unexpected_errors": len(load.unexpected),
        "hanging": len(hanging),
        "unexpected_examples": load.unexpected[:10],
        "rss_bytes": rss,
        "rss_growth_after_warmup": None if growth is None else round(growth, 4),
        "gauges_at_end": {g: at_end.get(g) for g in GAUGES},
        "all_freed_after_s": freed_after_s,
    }


def print_report(r: dict) -> None:
    print(
        f"{r['clients']} clients for {r['duration_s']} s against {r['url']}: {r['requests']} requests, "
        f"{r['requests_per_s']} per s, {r['unexpected_errors']} unexpected errors, {r['hanging']} hanging"
    )
    print(f"{'scenario':20} {'count':>6} {'p50 s':>7} {'p99 s':>7}")
    for name, s in r["routes"].items():
        print(f"{name:20} {s['count']:>6} {s['p50_s']:>7.3f} {s['p99_s']:>7.3f}")
    print("outcomes: " + ", ".join(f"{k}: {v}" for k, v in r["outcomes"].items()))
    mb = {k: None if v is None else round(v / 2**20, 1) for k, v in r["rss_bytes"].items()}
    print(
        f"server RSS MB: start {mb['start']}, after warm-up {mb['after_warmup']}, end {mb['end']} "
        f"(growth after warm-up {r['rss_growth_after_warmup']})"
    )
    freed = r["all_freed_after_s"]
    print(
        "queue and slots: "
        + (
            "all freed" + (f" {freed:.1f} s after the run" if freed else "")
            if freed is not None
            else f"NOT freed: {r['gauges_at_end']}"
        )
    )
    for example in r["unexpected_examples"]:
        print(f"  unexpected: {example}")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="a running server, e.g. http://127.0.0.1:8000 (loopback)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the warm-up RSS reading")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help=f"comma-separated scenarios to run (default all: {', '.join(SCENARIOS)})")
    parser.add_argument(
        "--faults", action="store_true", help="the server injects decode faults (PIXELCNN_FAULT_EVERY_STEPS)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    scenarios = SCENARIOS
    if args.only:
        unknown = set(args.only.split(",")) - set(SCENARIOS)
        if unknown:
            parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
        scenarios = {name: SCENARIOS[name] for name in args.only.split(",")}
    result = asyncio.run(
        run_load(args.url, args.clients, args.duration, args.seed, args.warmup, scenarios, args.faults)
    )
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    ok = result["unexpected_errors"] == 0 and result["hanging"] == 0 and result["all_freed_after_s"] is not None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run())
