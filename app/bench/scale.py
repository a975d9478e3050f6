"""Scale-out behind the gateway: `pixelcnn bench scale [--clients 32] [--n 8] [--duration 60] [--json]`.

Starts one `pixelcnn serve` replica per CPU core in `--cpus` (pinned with taskset, one decode lane and one
torch thread each), then for each count in `--replicas` runs the repository's gateway (deploy/nginx.conf
rendered for loopback, see app/bench/gateway.py) in front of that many of them, and drives it with
`--clients` concurrent clients posting non-streamed `/sample` requests of `--n` images for `--duration`
seconds after `--warmup` seconds. It reports images/s, requests, p50/p99 latency, errors and how the
gateway spread the requests over the replicas, for every count side by side, and the throughput of
each count over the first.

The clients share the cores with the replicas and nginx, so they are kept light: each is a thread with
one keep-alive connection (the standard library's http.client), and a request of several images costs
the client one small JSON answer while it costs a replica a share of its decode batch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .gateway import Gateway, Replica, require_tool


@dataclass
class Completed:
    finished: float  # time.perf_counter() when the answer was read
    latency_s: float
    status: int | str  # HTTP status, or the name of a connection error
    images: int


@dataclass
class ClientRun:
    completed: list[Completed] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(port: int, n: int, seed: int, stop_at: float, run: ClientRun) -> None:
    """Post /sample n=`n` (fresh seed each time) over one keep-alive connection until `stop_at`."""
    rng = random.Random(seed)
    headers = {"Content-Type": "application/json"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        while time.perf_counter() < stop_at:
            body = json.dumps({"n": n, "seed": rng.randrange(2**31)})
            started = time.perf_counter()
            try:
                connection.request("POST", "/sample", body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                status = response.status
                images = len(json.loads(payload)["images"]) if status == 200 else 0
            except (OSError, http.client.HTTPException) as error:
                connection.close()  # reconnects on the next request
                status, images = type(error).__name__, 0
            with run.lock:
                run.completed.append(Completed(time.perf_counter(), time.perf_counter() - started, status, images))
    finally:
        connection.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def drive(gateway: Gateway, clients: int, n: int, warmup_s: float, duration_s: float, seed: int) -> dict:
    """`clients` client threads against the gateway; counts what completes inside the measured window."""
    run = ClientRun()
    started = time.perf_counter()
    window = (started + warmup_s, started + warmup_s + duration_s)
    threads = [
        threading.Thread(
            target=client_loop,
            args=(gateway.port, n, seed * 1000 + k, window[1], run),
            name=f"scale-client-{k}",
            daemon=True,
        )
        for k in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    measured = [c for c in run.completed if window[0] <= c.finished <= window[1]]
    ok = [c for c in measured if c.status == 200]
    latencies = [c.latency_s for c in ok]
    statuses = Counter(str(c.status) for c in measured if c.status != 200)
    return {
        "images_per_s": round(sum(c.images for c in ok) / duration_s, 2),
        "requests": len(ok),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
        "errors": dict(statuses),
    }


def upstream_shares(lines: list[str]) -> dict[str, int]:
    """Answered /sample requests per replica address, from the gateway's access log (the last address
    of a retried request is the one that answered)."""
    shares: Counter[str] = Counter()
    for line in lines:
        match = re.search(r'"POST /sample [^"]*" 200 .* upstream=(\S+(?:, \S+)*) upstream_status=', line)
        if match:
            shares[match[1].split(", ")[-1]] += 1
    return dict(shares)


def nginx_version() -> str:
    run = subprocess.run([require_tool("nginx", "nginx"), "-v"], capture_output=True, text=True, check=False)
    return run.stderr.strip().removeprefix("nginx version: nginx/")


def bench(args: argparse.Namespace) -> dict:
    cpus = args.cpus
    counts = args.replicas
    if max(counts) > len(cpus):
        raise RuntimeError(f"{max(counts)} replicas need as many cores in --cpus, got {cpus}")
    with tempfile.TemporaryDirectory(prefix="pixelcnn-scale-") as workdir:
        replicas = [Replica(args.model_store, Path(workdir), cpu=cpu, model=args.model) for cpu in cpus[: max(counts)]]
        try:
            for replica in replicas:
                replica.wait_ready()
            runs = []
            for count in counts:
                serving = replicas[:count]
                with Gateway([r.address for r in serving]) as gateway:
                    result = drive(gateway, args.clients, args.n, args.warmup, args.duration, args.seed)
                    shares = upstream_shares(gateway.log_lines())
                result = {
                    "replicas": count,
                    "cpus": cpus[:count],
                    **result,
                    "requests_per_replica": [shares.get(r.address, 0) for r in serving],
                }
                runs.append(result)
                print(f"{count} replica(s): {result['images_per_s']} images/s", file=sys.stderr)
        finally:
            for replica in replicas:
                replica.stop()
    first = runs[0]["images_per_s"]
    return {
        "model": args.model,
        "model_store": str(args.model_store),
        "clients": args.clients,
        "n": args.n,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "nginx": nginx_version(),
        "runs": runs,
        "throughput_over_first": {
            str(r["replicas"]): round(r["images_per_s"] / first, 2) if first else None for r in runs
        },
    }


def print_table(result: dict) -> None:
    model = result["model"] or "the default model"
    print(
        f"{model} of {result['model_store']}: {result['clients']} clients posting /sample n={result['n']} "
        f"through nginx {result['nginx']} (deploy/nginx.conf), {result['duration_s']:.0f} s each after "
        f"{result['warmup_s']:.0f} s of warm-up; one core, one lane per replica"
    )
    header = (
        f"{'replicas':>8} {'cores':>6} {'images/s':>9} {'x first':>8} {'requests':>9} {'p50 s':>7} "
        f"{'p99 s':>7} {'per replica':>12} errors"
    )
    print(header)
    for run in result["runs"]:
        ratio = result["throughput_over_first"][str(run["replicas"])]
        errors = ", ".join(f"{k}: {v}" for k, v in run["errors"].items()) or "0"
        print(
            f"{run['replicas']:>8} {','.join(map(str, run['cpus'])):>6} {run['images_per_s']:>9.1f} "
            f"{ratio:>7.2f}x {run['requests']:>9} {run['p50_s']:>7.3f} {run['p99_s']:>7.3f} "
            f"{'/'.join(map(str, run['requests_per_replica'])):>12} {errors}"
        )


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-store", type=Path, default=Path("model_store"), help="default model_store")
    parser.add_argument("--model", help="model to sample (default: the server's default)")
    available = sorted(os.sched_getaffinity(0))
    parser.add_argument(
        "--cpus",
        type=int_list,
        default=available,
        help=f"cores to pin the replicas to, one each (default: all usable, {available})",
    )
    parser.add_argument("--replicas", type=int_list, default=[1, 2], help="replica counts to measure (default 1,2)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--n", type=int, default=8, help="images per request (default 8)")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds per count (default 60)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the requests (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if min(args.replicas) < 1:
        parser.error("--replicas: counts must be at least 1")
    try:
        result = bench(args)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(run())
