"""Soak behind the gateway, with faults: `pixelcnn bench soak [--model-store DIR] [--clients 12]
[--duration 3600] [--fault-every-steps 97] [--kill-at 1200,2400] [--json]`.

One command runs two `pixelcnn serve` replicas behind the repository's gateway (deploy/nginx.conf rendered
for loopback, as `pixelcnn bench scale` does), drives it with the hostile client mix of `pixelcnn bench
load` (streams read to the end, dropped and read slowly, bodies sent slowly, deadlines, dropped
/likelihood...), has the replicas fail every Nth decode step (PIXELCNN_FAULT_EVERY_STEPS), and at each
`--kill-at` second SIGKILLs a replica (the first, then the second, ...) and starts it again on the same
port `--restart-after` seconds later.

The report: requests by outcome; unexpected errors (must be 0); requests left hanging (must be 0); for
each fault, the seconds from it to the end of every request it ended (an injected fault's time is in its
message; a kill's is when the signal went), all within 1 s; what the gateway retried (nginx sends a
request whose replica failed before answering to the other one: the client sees that one's answer; a
stream already under way cannot be retried and is cut: `cut_by_replica_kill`); each replica process's
resident memory, read every `--rss-every` seconds, as the median of its first minute after `--warmup`
and of its last minute (growth over 3% is reported as a LEAK); and the queue, slot and request gauges
of every replica back to 0 at the end. The exit status is 1 if any of these fails.
`--leak-bytes-per-request` plants a leak (PIXELCNN_FAULT_LEAK_BYTES_PER_REQUEST) the report must flag.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .gateway import Gateway, Replica
from .load import (
    SCENARIOS,
    Load,
    first_image,
    metrics,
    percentile,
    print_summary,
    print_unexpected,
    run_clients,
    seconds_until_freed,
    summary,
)

RSS_GROWTH_LIMIT = 0.03  # after warm-up, per replica process
FAULT_TO_END_LIMIT_S = 1.0  # from a fault to the end of each request it ended
RSS = "process_resident_memory_bytes"
# Its client reads a line per 50 ms: it reads a stream's error event or cut seconds after they happen.
SLOW = "stream_slow_reader"
RETRY_AFTER_S = 1.0  # the server's and the gateway's Retry-After
RSS_WINDOW_S = 60.0


@dataclass
class ReplicaProcess:
    """One life of a replica: from its start (or restart) to its kill or the end of the run."""

    replica: int
    pid: int
    started_s: float  # seconds into the run
    warmup_s: float
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, bytes)
    alive: bool = True
    ended: str = "ran to the end"

    def growth_window(self) -> tuple[float | None, float | None]:
        """The median RSS of the first and of the last window after warm-up (RSS_WINDOW_S, or a quarter
        of the measured time if that is shorter): one reading moves by a few % from one minute to the
        next as the allocator takes and gives back memory, a median of a dozen does not."""
        measured = [(t, v) for t, v in self.rss if t >= self.started_s + self.warmup_s]
        if len(measured) < 2:
            return None, None  # its warm-up ended with the run (or its life)
        window = min(RSS_WINDOW_S, (measured[-1][0] - measured[0][0]) / 4)
        first = [v for t, v in measured if t <= measured[0][0] + window]
        last = [v for t, v in measured if t >= measured[-1][0] - window]
        return statistics.median(first), statistics.median(last)

    def report(self) -> dict:
        after_warmup, end = self.growth_window()
        growth = round(end / after_warmup - 1, 4) if end and after_warmup else None
        readings = {"start": self.rss[0][1] if self.rss else None, "after_warmup": after_warmup, "end": end}
        readings["max"] = max((v for _, v in self.rss), default=None)
        return {
            "replica": self.replica,
            "pid": self.pid,
            "started_s": round(self.started_s, 1),
            "ended": self.ended,
            "rss_readings": len(self.rss),
            "rss_mb": {k: None if v is None else round(v / 2**20, 1) for k, v in readings.items()},
            "rss_growth_after_warmup": growth,
            "leak": growth is not None and growth > RSS_GROWTH_LIMIT,
        }


@dataclass
class Soak:
    replicas: list[Replica]
    direct: httpx.AsyncClient  # to each replica itself, for its /metrics
    warmup_s: float
    restart_after_s: float
    duration_s: float
    rss_every_s: float
    load: Load
    started: float = field(default_factory=time.perf_counter)
    processes: list[ReplicaProcess] = field(default_factory=list)
    current: dict[int, ReplicaProcess] = field(default_factory=dict)
    kills: list[dict] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    async def read_rss(self, replica: int) -> None:
        process = self.current[replica]
        try:
            rss = (await metrics(self.direct, self.replicas[replica].url)).get(RSS)
        except httpx.HTTPError:
            return  # being killed or restarted
        if rss and process.alive:
            process.rss.append((self.elapsed(), rss))

    async def begin(self, replica: int) -> None:
        process = ReplicaProcess(replica, self.replicas[replica].process.pid, self.elapsed(), self.warmup_s)
        self.processes.append(process)
        self.current[replica] = process
        await self.read_rss(replica)

    async def sample_rss(self) -> None:
        """Every replica's RSS every rss_every_s until the end of the run."""
        while self.elapsed() < self.duration_s:
            for replica in list(self.current):
                await self.read_rss(replica)
            await asyncio.sleep(self.rss_every_s)

    async def kill_and_restart(self, replica: int) -> None:
        process = self.current[replica]
        await self.read_rss(replica)  # its last reading: the process is about to go
        process.alive = False
        self.replicas[replica].process.kill()  # SIGKILL: no drain, no error events, sockets reset
        killed = time.perf_counter()
        self.load.kills.append(killed)
        process.ended = f"SIGKILL at {killed - self.started:.1f} s"
        await asyncio.sleep(self.restart_after_s)
        self.replicas[replica].restart()
        restarted = time.perf_counter()
        await asyncio.to_thread(self.replicas[replica].wait_ready)
        ready = time.perf_counter()
        self.kills.append(
            {
                "replica": replica,
                "at_s": round(killed - self.started, 1),
                "restarted_at_s": round(restarted - self.started, 1),
                "ready_after_s": round(ready - killed, 1),
            }
        )
        await self.begin(replica)


def gateway_retries(access_log: list[str]) -> dict[str, int]:
    """Requests the gateway sent to a second replica, by the statuses it got (e.g. "502, 200": the first
    replica failed before answering, the second answered), from its access log."""
    retried: Counter[str] = Counter()
    for line in access_log:
        match = re.search(r" upstream_status=(.*?) upstream_time=", line)
        if match and "," in match[1]:
            retried[match[1]] += 1
    return dict(retried)


async def run_soak(
    store: Path,
    workdir: Path,
    *,
    model: str | None = None,
    clients: int = 12,
    duration_s: float = 3600.0,
    warmup_s: float = 300.0,
    seed: int = 0,
    fault_every_steps: int = 97,
    kill_at_s: tuple[float, ...] = (1200.0, 2400.0),
    restart_after_s: float = 2.0,
    leak_bytes_per_request: int = 0,
    rss_every_s: float = 5.0,
) -> dict:
    env = {
        "MALLOC_ARENA_MAX": "2",  # as the image sets it (Dockerfile says why)
        "PIXELCNN_FAULT_EVERY_STEPS": str(fault_every_steps),
        "PIXELCNN_FAULT_LEAK_BYTES_PER_REQUEST": str(leak_bytes_per_request),
    }
    replicas = [Replica(store, workdir, env=env, model=model) for _ in range(2)]
    try:
        for replica in replicas:
            await asyncio.to_thread(replica.wait_ready)
        with Gateway([r.address for r in replicas]) as gateway:
            limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
            async with (
                httpx.AsyncClient(base_url=gateway.url, timeout=300, limits=limits) as client,
                httpx.AsyncClient(timeout=30) as direct,
            ):
                faults = fault_every_steps > 0
                image = await first_image(client, seed, faults)
                load = Load(client, image, seed, SCENARIOS, faults, pause_after_503_s=RETRY_AFTER_S)
                soak = Soak(replicas, direct, warmup_s, restart_after_s, duration_s, rss_every_s, load)
                for k in range(len(replicas)):
                    await soak.begin(k)
                events: list[tuple[float, Callable[[], Awaitable[None]]]] = [(0.0, soak.sample_rss)]
                for k, at_s in enumerate(kill_at_s):  # the first replica, then the second, ...
                    events.append((at_s, functools.partial(soak.kill_and_restart, k % len(replicas))))
                elapsed, hanging = await run_clients(load, clients, duration_s, events)
                freed = {}
                for k, replica in enumerate(replicas):
                    await soak.read_rss(k)
                    freed[k] = await seconds_until_freed(direct, replica.url)
                gauges = {k: await metrics(direct, r.url) for k, r in enumerate(replicas)}
            access_log = gateway.log_lines()
    finally:
        for replica in replicas:
            replica.stop()
    by_outcome: Counter[str] = Counter()
    for key, n in summary(load, elapsed, hanging)["outcomes"].items():
        by_outcome[key.split(" ", 1)[1]] += n
    fault_to_end = {}
    for kind in sorted({kind for kind, _ in load.fault_to_end_s}):
        read = [s for (k, scenario), v in load.fault_to_end_s.items() if k == kind and scenario != SLOW for s in v]
        slow = load.fault_to_end_s.get((kind, SLOW), [])
        fault_to_end[kind] = {
            "requests": len(read) + len(slow),
            "p99_s": round(percentile(read, 0.99), 3) if read else None,
            "max_s": round(max(read), 3) if read else None,
            "slow_reader_max_s": round(max(slow), 3) if slow else None,
        }
    processes = [p.report() for p in soak.processes]
    result = {
        "url": gateway.url,
        "clients": clients,
        "replicas": len(replicas),
        "fault_every_steps": fault_every_steps,
        "leak_bytes_per_request": leak_bytes_per_request,
        **summary(load, elapsed, hanging),
        "by_outcome": dict(sorted(by_outcome.items())),
        "kills": soak.kills,
        "gateway_retries": gateway_retries(access_log),
        "fault_to_end": fault_to_end,
        "processes": processes,
        "all_freed_after_s": {str(k): v for k, v in freed.items()},
        "gauges_at_end": {str(k): {g: v for g, v in m.items() if g != RSS} for k, m in gauges.items()},
    }
    result["verdict"] = verdict(result)
    return result


def verdict(r: dict) -> list[str]:
    """What failed, one line each; empty when the soak passed."""
    failed = []
    if r["unexpected_errors"]:
        failed.append(f"{r['unexpected_errors']} unexpected errors")
    if r["hanging"]:
        failed.append(f"{r['hanging']} requests left hanging")
    for kind, figures in r["fault_to_end"].items():
        if figures["max_s"] is not None and figures["max_s"] > FAULT_TO_END_LIMIT_S:
            failed.append(f"a {kind} took {figures['max_s']} s to end a request (limit {FAULT_TO_END_LIMIT_S} s)")
    for p in r["processes"]:
        if p["leak"]:
            failed.append(
                f"LEAK: replica {p['replica']} (pid {p['pid']}) grew {p['rss_growth_after_warmup']:.1%} after "
                f"warm-up ({p['rss_mb']['after_warmup']} -> {p['rss_mb']['end']} MB; limit {RSS_GROWTH_LIMIT:.0%})"
            )
    for replica, freed in r["all_freed_after_s"].items():
        if freed is None:
            failed.append(f"replica {replica}: gauges not back to 0: {r['gauges_at_end'][replica]}")
    return failed


def print_report(r: dict) -> None:
    print_summary(r)
    print("by outcome: " + ", ".join(f"{k}: {v}" for k, v in r["by_outcome"].items()))
    for kill in r["kills"]:
        print(
            f"replica {kill['replica']} SIGKILLed at {kill['at_s']} s, restarted at {kill['restarted_at_s']} s, "
            f"serving again {kill['ready_after_s']} s after the kill"
        )
    retries = ", ".join(f"{k}: {v}" for k, v in r["gateway_retries"].items()) or "none"
    print(f"retried by the gateway on the other replica (upstream statuses: requests): {retries}")
    print(f"{'fault':16} {'requests ended':>14} {'p99 s':>7} {'max s':>7} {'slow readers max s':>18}")
    for kind, f in r["fault_to_end"].items():
        figures = [f["p99_s"], f["max_s"], f["slow_reader_max_s"]]
        p99, top, slow = ("-" if x is None else f"{x:.3f}" for x in figures)
        print(f"{kind:16} {f['requests']:>14} {p99:>7} {top:>7} {slow:>18}")
    print("(seconds from each fault to the end of every request it ended, as its client saw it)")
    print(
        f"{'replica':>7} {'pid':>8} {'from s':>7} {'RSS MB start':>12} {'warm':>7} {'end':>7} {'max':>7} "
        f"{'growth':>7}  ended   (warm, end: medians of the first and last minute after warm-up)"
    )
    for p in r["processes"]:
        mb = p["rss_mb"]
        growth = p["rss_growth_after_warmup"]
        print(
            f"{p['replica']:>7} {p['pid']:>8} {p['started_s']:>7.1f} {mb['start']!s:>12} {mb['after_warmup']!s:>7} "
            f"{mb['end']!s:>7} {mb['max']!s:>7} {'-' if growth is None else f'{growth:.2%}':>7}  {p['ended']}"
            + ("  LEAK" if p["leak"] else "")
        )
    freed = r["all_freed_after_s"]
    print(
        "gauges at the end: "
        + ", ".join(f"replica {k} " + ("back to 0" if v is not None else "NOT 0") for k, v in freed.items())
    )
    print_unexpected(r)
    print("PASS" if not r["verdict"] else "FAIL: " + "; ".join(r["verdict"]))


def seconds_list(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-store", type=Path, default=Path("model_store"), help="default model_store")
    parser.add_argument("--model", help="the replicas' default model (default: the server's default)")
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients (default 12)")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds (default 3600)")
    parser.add_argument(
        "--warmup", type=float, default=300.0, help="seconds of a replica process before its warm-up RSS (300)"
    )
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS readings (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    parser.add_argument(
        "--fault-every-steps", type=int, default=97, help="PIXELCNN_FAULT_EVERY_STEPS of the replicas (97; 0: none)"
    )
    parser.add_argument(
        "--kill-at",
        type=seconds_list,
        default=(1200.0, 2400.0),
        help="seconds into the run to SIGKILL a replica, comma-separated (default 1200,2400; empty: none)",
    )
    parser.add_argument("--restart-after", type=float, default=2.0, help="seconds from a kill to the restart (2)")
    parser.add_argument(
        "--leak-bytes-per-request",
        type=int,
        default=0,
        help="plant a leak: PIXELCNN_FAULT_LEAK_BYTES_PER_REQUEST of the replicas (default 0: none)",
    )
    parser.add_argument("--workdir", type=Path, help="where the replicas' logs go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--report", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pixelcnn-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(
        run_soak(
            args.model_store,
            workdir,
            model=args.model,
            clients=args.clients,
            duration_s=args.duration,
            warmup_s=args.warmup,
            seed=args.seed,
            fault_every_steps=args.fault_every_steps,
            kill_at_s=args.kill_at,
            restart_after_s=args.restart_after,
            leak_bytes_per_request=args.leak_bytes_per_request,
            rss_every_s=args.rss_every,
        )
    )
    if args.report:
        args.report.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    return 1 if result["verdict"] else 0


if __name__ == "__main__":
    sys.exit(run())
