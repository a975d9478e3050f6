"""Load and soak: `pixelcnn bench load --url URL [--clients 64] [--duration 600] [--json]`.

N concurrent clients (asyncio tasks over httpx, loopback only) each loop over a weighted mix until the
duration is up: streamed /sample (read to the end), plain /sample as JSON or PNG, /complete (multipart),
/likelihood (multipart), streams dropped after their first row, and streams read slowly. It reports
throughput, p50/p99 latency per scenario, outcomes by status, the server's resident memory (from
/metrics) after warm-up and at the end, and whether every queue place and decode slot was freed after
the run (queue size, active images, active requests back to 0 within 10 s). Any 5xx, or a status that a
scenario does not expect, counts as an unexpected error; 503 `overloaded` is an expected answer to load,
504 `timeout` to a request with a deadline, and with --faults (a server run with
PIXELCNN_FAULT_EVERY_STEPS) 500 `engine_error` or a stream's `error` event of that type, counted as
`injected_fault`. A request not finished 60 s after the duration is `hanging` (cancelled, and reported).
`pixelcnn bench soak` (app/bench/soak.py) drives the same clients through the gateway while it kills
replicas: a request that a kill cut off is `cut_by_replica_kill`, expected and counted apart.
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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

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
    "deadline": 10,  # X-Request-Timeout of 0.05-2 s: 200, or 504 `timeout`
}
# 503: overloaded (Retry-After) or not ready; 504: timeout (a deadline); answers the server may give under load
CUT_BY_KILL = "cut_by_replica_kill"
EXPECTED = {200, "injected_fault", "dropped", CUT_BY_KILL, "503 overloaded", "504 timeout", "503 not_ready"}
# The gateway's own 503 (deploy/nginx.conf, @no_replica): no replica could take the request.
NO_REPLICA = "503 no_replica"
EXPECTED.add(NO_REPLICA)
# The time an injected decode fault happened, in its message (app/engine/lanes.py), seconds since the epoch.
FAULT_AT = re.compile(r"injected decode fault \(every \d+ steps\) at ([0-9.]+)")
GAUGES = ("pixelcnn_queue_size", "pixelcnn_active_images", "pixelcnn_engine_active_requests")


def scrape(text: str) -> dict[str, float]:
    """The few /metrics values the report needs: RSS, and the sums over models of the gauges."""
    values: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in GAUGES or sample.name == "process_resident_memory_bytes":
                values[sample.name] += sample.value
    return dict(values)


class Load:
    def __init__(
        self,
        client: httpx.AsyncClient,
        image_png: bytes,
        seed: int,
        scenarios: dict[str, int],
        faults: bool = False,
        pause_after_503_s: float = 0.0,
    ) -> None:
        self.client = client
        # A client that honours Retry-After waits before its next request (the soak's clients do; a load
        # test's clients hammer on, which is what a load test is for).
        self.pause_after_503_s = pause_after_503_s
        self.faults = faults  # the server injects decode faults: engine_error answers are expected
        self.scenarios = scenarios
        self.image_png = image_png
        self.height = Image.open(io.BytesIO(image_png)).height
        self.rng = random.Random(seed)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.unexpected: list[str] = []
        self.kills: list[float] = []  # time.perf_counter() of each replica kill (pixelcnn bench soak)
        # Seconds from a fault (an injected decode fault, a replica kill) to the end of each request it
        # ended, by (fault, scenario): a slow reader reads its stream's end late by design.
        self.fault_to_end_s: dict[tuple[str, str], list[float]] = defaultdict(list)

    def record(self, scenario: str, started: float, status: int | str, detail: str = "") -> int | str:
        """Count a request's outcome (503s by their error type); returns it."""
        now = time.perf_counter()
        if self.faults and (status == 500 or status == "stream ended with error") and "engine_error" in detail:
            status = "injected_fault"
            fault_at = FAULT_AT.search(detail)
            if fault_at:
                self.fault_to_end_s[("injected_fault", scenario)].append(time.time() - float(fault_at[1]))
        elif status in (503, 504):
            error_type = re.search(r'"type":\s*"(\w+)"', detail)
            no_replica = "no replica of the server" in detail
            status = NO_REPLICA if no_replica else f"{status} {error_type and error_type[1]}"
        elif isinstance(status, str) and status not in EXPECTED and "error" not in status:
            # A connection cut, or a stream ended without `done`: a kill's doing if one came after the start.
            kill = next((k for k in reversed(self.kills) if started < k <= now), None)
            if kill is not None:
                status = CUT_BY_KILL
                self.fault_to_end_s[("replica_kill", scenario)].append(now - kill)
        self.latency[scenario].append(now - started)
        self.outcomes[(scenario, str(status))] += 1
        if status not in EXPECTED:
            self.unexpected.append(f"{scenario}: {status} {detail[:200]}")
        return status

    async def one(self, scenario: str) -> int | str:
        body = {
            "n": self.rng.choice([1, 1, 2, 4]),
            "seed": self.rng.randrange(2**31),
            "temperature": self.rng.choice([0.8, 1.0, 1.2]),
        }
        started = time.perf_counter()
        try:
            if scenario.startswith("sample_stream") or scenario.startswith("stream_"):
                return await self.stream(scenario, {**body, "stream": True}, started)
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
                    return self.record(scenario, started, "dropped")
            elif scenario == "complete":
                files = {"image": ("top.png", self.image_png, "image/png")}
                data = {"n": str(body["n"]), "seed": str(body["seed"]), "rows": str(self.rng.randrange(1, self.height))}
                response = await self.client.post("/complete", files=files, data=data)
            else:
                files = [("image", (f"{k}.png", self.image_png, "image/png")) for k in range(body["n"])]
                response = await self.client.post("/likelihood", files=files)
            return self.record(
                scenario, started, response.status_code, response.text if response.status_code >= 400 else ""
            )
        except httpx.HTTPError as error:
            return self.record(scenario, started, type(error).__name__, str(error))

    async def stream(self, scenario: str, body: dict, started: float) -> int | str:
        async with self.client.stream("POST", "/sample", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return self.record(scenario, started, response.status_code, response.text)
            last_event, last_data = None, ""
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    last_data = line
                if line.startswith("event: "):
                    last_event = line[7:]
                    if scenario == "stream_dropped" and last_event == "row":
                        # returning leaves the block, which closes the connection mid-stream
                        return self.record(scenario, started, 200)
                elif scenario == "stream_slow_reader":
                    await asyncio.sleep(0.05)
            if last_event == "done":
                return self.record(scenario, started, 200)
            return self.record(scenario, started, f"stream ended with {last_event}", last_data)

    async def client_loop(self, deadline: float) -> None:
        names, weights = list(self.scenarios), list(self.scenarios.values())
        while time.perf_counter() < deadline:
            outcome = await self.one(self.rng.choices(names, weights)[0])
            if str(outcome).startswith("503") and self.pause_after_503_s:
                await asyncio.sleep(min(self.pause_after_503_s, deadline - time.perf_counter()))


async def metrics(client: httpx.AsyncClient, url: str = "") -> dict[str, float]:
    """`url`: a server other than the client's base URL (a replica behind the gateway)."""
    return scrape((await client.get(f"{url}/metrics")).text)


async def first_image(client: httpx.AsyncClient, seed: int, faults: bool) -> bytes:
    """The image the scenarios send; with injected faults, a try may fail."""
    for _ in range(10):
        first = await client.post("/sample", json={"n": 1, "seed": seed}, headers={"Accept": "image/png"})
        if first.status_code == 200 or not faults:
            break
    first.raise_for_status()
    return first.content


async def run_clients(
    load: Load, clients: int, duration_s: float, events: Sequence[tuple[float, Callable[[], Awaitable[None]]]] = ()
) -> tuple[float, int]:
    """`clients` loops of `load` for `duration_s`, with each of `events` (seconds from the start, action)
    run on time alongside; an event not begun by the end is dropped, one under way is finished. Returns
    the seconds elapsed and how many requests were left hanging (unfinished 60 s after the end: cancelled)."""
    started = time.perf_counter()
    workers = [asyncio.create_task(load.client_loop(started + duration_s)) for _ in range(clients)]
    begun: set[int] = set()

    async def at(delay_s: float, index: int, action: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(delay_s)
        begun.add(index)
        await action()

    timed = [asyncio.create_task(at(delay, k, action)) for k, (delay, action) in enumerate(events)]
    _, hanging = await asyncio.wait(workers, timeout=duration_s + 60)
    for worker in hanging:  # a request that never ended: reported, then given up
        worker.cancel()
    for k, task in enumerate(timed):
        if k not in begun:
            task.cancel()
    await asyncio.gather(*(task for k, task in enumerate(timed) if k in begun))
    return time.perf_counter() - started, len(hanging)


async def seconds_until_freed(client: httpx.AsyncClient, url: str = "") -> float | None:
    """Seconds until the queue, the decode slots and the active requests are all back to 0; None if not
    within 10 s."""
    for waited in range(100):
        now = await metrics(client, url)
        if all(now.get(g, 0) == 0 for g in GAUGES):
            return waited * 0.1
        await asyncio.sleep(0.1)
    return None


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def summary(load: Load, elapsed: float, hanging: int) -> dict:
    """The clients' side of a run: requests, latency per scenario, outcomes, unexpected and hanging."""
    completed = sum(len(v) for v in load.latency.values())
    return {
        "duration_s": round(elapsed, 1),
        "requests": completed,
        "requests_per_s": round(completed / elapsed, 2),
        "routes": {
            name: {"count": len(v), "p50_s": round(statistics.median(v), 3), "p99_s": round(percentile(v, 0.99), 3)}
            for name, v in sorted(load.latency.items())
        },
        "outcomes": {f"{s} {status}": n for (s, status), n in sorted(load.outcomes.items())},
        "unexpected_errors": len(load.unexpected),
        "hanging": hanging,
        "unexpected_examples": load.unexpected[:10],
    }


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
        load = Load(client, await first_image(client, seed, faults), seed, scenarios, faults)
        at_start = await metrics(client)
        after_warmup: dict[str, float] = {}

        async def read_warmup() -> None:
            after_warmup.update(await metrics(client))

        elapsed, hanging = await run_clients(load, clients, duration_s, [(min(warmup_s, duration_s), read_warmup)])
        at_end = await metrics(client)
        freed_after_s = await seconds_until_freed(client)
    rss = {
        k: v.get("process_resident_memory_bytes")
        for k, v in (("start", at_start), ("after_warmup", after_warmup), ("end", at_end))
    }
    growth = (rss["end"] / rss["after_warmup"] - 1) if rss["end"] and rss["after_warmup"] else None
    return {
        "url": url,
        "clients": clients,
        **summary(load, elapsed, hanging),
        "rss_bytes": rss,
        "rss_growth_after_warmup": None if growth is None else round(growth, 4),
        "gauges_at_end": {g: at_end.get(g) for g in GAUGES},
        "all_freed_after_s": freed_after_s,
    }


def print_summary(r: dict) -> None:
    print(
        f"{r['clients']} clients for {r['duration_s']} s against {r['url']}: {r['requests']} requests, "
        f"{r['requests_per_s']} per s, {r['unexpected_errors']} unexpected errors, {r['hanging']} hanging"
    )
    print(f"{'scenario':20} {'count':>6} {'p50 s':>7} {'p99 s':>7}")
    for name, s in r["routes"].items():
        print(f"{name:20} {s['count']:>6} {s['p50_s']:>7.3f} {s['p99_s']:>7.3f}")
    print("outcomes: " + ", ".join(f"{k}: {v}" for k, v in r["outcomes"].items()))


def print_report(r: dict) -> None:
    print_summary(r)
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
    print_unexpected(r)


def print_unexpected(r: dict) -> None:
    for example in r["unexpected_examples"]:
        print(f"  unexpected: {example}")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="a running server, e.g. http://127.0.0.1:8000 (loopback)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the warm-up RSS reading")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    parser.add_argument("--only", help=f"comma-separated scenarios to run (default all: {', '.join(SCENARIOS)})")
    parser.add_argument(
        "--faults", action="store_true", help="the server injects decode faults (PIXELCNN_FAULT_EVERY_STEPS)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
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
