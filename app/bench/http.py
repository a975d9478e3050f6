"""HTTP benchmark: `pixelcnn bench http [--url URL] [--json]`.

Measures, against a running server (`--url`) or one started in-process on a free port:
  (a) POST /sample of n images vs POST /likelihood of the same n images: generation is H*W*C sequential
      steps, scoring one parallel pass, so the ratio shows what autoregressive sampling costs;
  (b) `concurrency` simultaneous /sample n=1 requests vs one: with continuous batching the wall time of
      all of them should be far below `concurrency` times one. Each of these clients is a thread with its
      own connection, using the standard library's http.client: with httpx's AsyncClient all requests
      share one event loop in this process, and its own work (~1 ms a request) was measured adding ~20 ms
      to 16 requests and nothing to one, i.e. the benchmark measuring itself;
  (c) time to the first streamed row vs the whole streamed request;
  and the serving overhead: one image's wall time (JSON and PNG) over the engine's time for it, which the
  server reports in its `Server-Timing: engine;dur=<ms>;desc="<k> threads"` header, and the concurrent
  requests' time over their arithmetic floor (`concurrency` x that engine time x the threads that drew it,
  / the decode lanes read from /metrics: a lone image is drawn on every idle lane's core by wavefront).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .servers import serve_in_thread


async def _timed(coro) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await coro
    return time.perf_counter() - started, result


async def _post(client: httpx.AsyncClient, path: str, **kwargs: Any) -> dict:
    response = await client.post(path, **kwargs)
    response.raise_for_status()
    return response.json()


class Clients:
    """Independent clients for (b): each request from its own thread and connection (stdlib http.client)."""

    def __init__(self, url: str, headers: dict[str, str], count: int) -> None:
        parts = urlsplit(url)
        self.connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.host, self.port = parts.hostname, parts.port
        self.path = parts.path.rstrip("/") + "/sample"  # a gateway may serve the API under a prefix
        self.headers = {"Content-Type": "application/json", **headers}
        self.pool = ThreadPoolExecutor(count, thread_name_prefix="bench-client")

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pool.shutdown()

    def _post(self, body: dict, accept: str) -> tuple[float, float, int]:
        """This request's seconds as its client saw them (from sending it to the last byte of the answer, on a
        connection opened beforehand), and the engine's seconds and the threads that drew it, from its
        Server-Timing header."""
        connection = self.connection(self.host, self.port, timeout=600)
        connection.connect()
        started = time.perf_counter()
        try:
            connection.request("POST", self.path, body=json.dumps(body), headers={**self.headers, "Accept": accept})
            response = connection.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - started
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"POST {self.path} answered {response.status}: {payload[:300]!r}")
        return elapsed, *engine_timing(response.getheader("Server-Timing"))

    async def post_all(
        self, bodies: list[dict], accept: str = "application/json"
    ) -> tuple[float, list[tuple[float, float, int]]]:
        """POST every body at once; seconds until the last answer, and each one's timing (`_post`)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        engine = await asyncio.gather(*(loop.run_in_executor(self.pool, self._post, body, accept) for body in bodies))
        return time.perf_counter() - started, list(engine)


def engine_timing(server_timing: str | None) -> tuple[float, int]:
    """`engine;dur=<ms>;desc="<k> threads"` (the server's Server-Timing header) -> seconds, threads (1 when
    the description is missing)."""
    match = re.search(r'\bengine;dur=([0-9.]+)(?:;desc="(\d+) threads?")?', server_timing or "")
    if match is None:
        raise RuntimeError(f"the server sent no engine time (Server-Timing: {server_timing!r}); is it this version?")
    return float(match.group(1)) / 1000, int(match.group(2) or 1)


async def decode_lanes(client: httpx.AsyncClient, model: str) -> int:
    """The model's decode lanes, from the server's /metrics."""
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        if family.name == "pixelcnn_engine_lanes":
            for sample in family.samples:
                if sample.labels.get("model") == model:
                    return int(sample.value)
    raise RuntimeError(f"/metrics has no pixelcnn_engine_lanes for model {model!r}")


async def measure_once(
    client: httpx.AsyncClient,
    clients: Clients,
    n: int,
    concurrency: int,
    repeat: int,
    extra: dict,
    runs: dict[str, list[float]],
) -> tuple[dict, dict]:
    """One repeat of (a), (b) and (c), appended to `runs`; returns the sampled body and the labels given."""
    sample_s, sampled = await _timed(_post(client, "/sample", json={"n": n, "seed": 1 + repeat, **extra}))
    images = [image["png"] for image in sampled["images"]]
    labels = [image["label"] for image in sampled["images"]]
    # One teacher-forced pass: a conditional model is scored given the labels it sampled with (without
    # them, /likelihood computes the exact marginal, one pass per class: measured once, by the caller).
    given = {"label": labels} if labels[0] is not None else {}
    score_s, _ = await _timed(_post(client, "/likelihood", json={"images": images, **given, **extra}))

    # One request's own time, measured in the thread that sends it (not the harness's hand-off to it).
    _, [(one_s, one_engine_s, one_threads)] = await clients.post_all([{"n": 1, "seed": 2 + repeat, **extra}])
    _, [(png_s, png_engine_s, _)] = await clients.post_all([{"n": 1, "seed": 2 + repeat, **extra}], "image/png")
    many_s, _ = await clients.post_all([{"n": 1, "seed": 100 * (repeat + 1) + i, **extra} for i in range(concurrency)])

    started, first_row_s = time.perf_counter(), None
    async with client.stream("POST", "/sample", json={"n": 1, "seed": 3 + repeat, "stream": True, **extra}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("event: row") and first_row_s is None:
                first_row_s = time.perf_counter() - started
    for key, value in (
        ("sample", sample_s),
        ("score", score_s),
        ("one", one_s),
        ("one_engine", one_engine_s),
        ("one_threads", one_threads),
        ("png", png_s),
        ("png_engine", png_engine_s),
        ("many", many_s),
        ("first_row", first_row_s),
        ("stream", time.perf_counter() - started),
    ):
        runs[key].append(value)
    return sampled, given


async def measure(url: str, model: str | None, n: int, concurrency: int, api_key: str | None, repeats: int = 5) -> dict:
    """Every measurement `repeats` times, interleaved (so each ratio compares runs made side by side, on a
    machine whose speed drifts); the report gives medians, and each repeat's concurrency ratio."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    extra = {"model": model} if model else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        ready = await client.get("/ready")
        if ready.status_code != 200:
            raise RuntimeError(f"the server at {url} is not ready: {ready.text}")
        await _post(client, "/sample", json={"n": 1, "seed": 0, **extra})  # warm-up

        keys = (
            "sample",
            "score",
            "one",
            "one_engine",
            "one_threads",
            "png",
            "png_engine",
            "many",
            "first_row",
            "stream",
        )
        runs: dict[str, list[float]] = {key: [] for key in keys}
        with Clients(url, headers, concurrency) as clients:
            await clients.post_all([{"n": 1, "seed": k, **extra} for k in range(concurrency)])  # warm-up
            for repeat in range(repeats):
                sampled, given = await measure_once(client, clients, n, concurrency, repeat, extra, runs)
        lanes = await decode_lanes(client, sampled["model"])
        marginal_s = None
        if given:
            images = [image["png"] for image in sampled["images"]]
            marginal_s, _ = await _timed(_post(client, "/likelihood", json={"images": images, **extra}))

    median = {key: statistics.median(values) for key, values in runs.items()}

    def ratio(a: str, b: str) -> float:  # the median of the repeats' own ratios: each made side by side
        return round(statistics.median(x / y for x, y in zip(runs[a], runs[b])), 2)

    # The arithmetic floor of the concurrent requests: their images' engine time (on as many cores as drew
    # one alone: a lone request draws on every idle lane) shared by the lanes.
    floors = [concurrency * one * threads / lanes for one, threads in zip(runs["one_engine"], runs["one_threads"])]
    return {
        "url": url,
        "model": sampled["model"],
        "shape": sampled["shape"],
        "n": n,
        "repeats": repeats,
        "sample_n_s": round(median["sample"], 4),
        "likelihood_n_s": round(median["score"], 4),
        "sample_over_likelihood": ratio("sample", "score"),
        "likelihood_marginal_n_s": None if marginal_s is None else round(marginal_s, 4),
        "concurrency": concurrency,
        "one_sample_s": round(median["one"], 4),
        "one_engine_s": round(median["one_engine"], 4),
        "one_engine_threads": int(median["one_threads"]),
        "one_over_engine": ratio("one", "one_engine"),
        "one_png_s": round(median["png"], 4),
        "one_png_over_engine": ratio("png", "png_engine"),
        "lanes": lanes,
        "concurrent_floor_s": round(statistics.median(floors), 4),
        "concurrent_samples_s": round(median["many"], 4),
        "concurrent_over_floor": round(statistics.median(m / f for m, f in zip(runs["many"], floors)), 2),
        "concurrent_over_one": ratio("many", "one"),
        "concurrent_over_one_each": [round(a / b, 2) for a, b in zip(runs["many"], runs["one"])],
        "concurrent_speedup": round(concurrency * median["one"] / median["many"], 2),
        "first_row_s": round(median["first_row"], 4),
        "stream_total_s": round(median["stream"], 4),
    }


def print_table(result: dict) -> None:
    rows = [
        (f"POST /sample n={result['n']}", f"{result['sample_n_s']:.3f} s"),
        (f"POST /likelihood of {result['n']} images", f"{result['likelihood_n_s']:.3f} s"),
        ("  sample / likelihood", f"{result['sample_over_likelihood']:.2f}x"),
        (
            "POST /likelihood, marginal over classes",
            "-" if result["likelihood_marginal_n_s"] is None else f"{result['likelihood_marginal_n_s']:.3f} s",
        ),
        ("POST /sample n=1", f"{result['one_sample_s']:.3f} s"),
        ("  its engine time (Server-Timing)", f"{result['one_engine_s']:.3f} s"),
        ("  HTTP / engine, JSON", f"{result['one_over_engine']:.2f}x"),
        ("  HTTP / engine, PNG", f"{result['one_png_over_engine']:.2f}x"),
        (f"{result['concurrency']} concurrent /sample n=1", f"{result['concurrent_samples_s']:.3f} s"),
        (
            f"  floor ({result['concurrency']} x engine x {result['one_engine_threads']} threads / "
            f"{result['lanes']} lanes)",
            f"{result['concurrent_floor_s']:.3f} s",
        ),
        ("  all concurrent / floor", f"{result['concurrent_over_floor']:.2f}x"),
        ("  all concurrent / one", f"{result['concurrent_over_one']:.2f}x"),
        ("    each repeat", " ".join(f"{ratio:.2f}" for ratio in result["concurrent_over_one_each"])),
        ("  speedup over sequential", f"{result['concurrent_speedup']:.1f}x"),
        ("first streamed row", f"{result['first_row_s']:.3f} s" if result["first_row_s"] is not None else "-"),
        ("whole streamed request", f"{result['stream_total_s']:.3f} s"),
    ]
    print(f"{result['model']} {result['shape']} at {result['url']}, medians of {result['repeats']} repeats")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--model-store", type=Path, help="in-process server: the model store")
    parser.add_argument("--model", help="model to use (default: the server's default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="in-process server: its device")
    parser.add_argument("--n", type=int, default=64, help="images for (a)")
    parser.add_argument("--concurrency", type=int, default=16, help="simultaneous requests for (b)")
    parser.add_argument("--repeats", type=int, default=5, help="times to repeat (a)-(c); medians are reported")
    parser.add_argument("--api-key", help="bearer token, for a server started with PIXELCNN_API_KEY")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        result = bench(args)
    except (RuntimeError, httpx.HTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


def bench(args: argparse.Namespace) -> dict:
    def go(url: str) -> dict:
        return asyncio.run(measure(url, args.model, args.n, args.concurrency, args.api_key, args.repeats))

    if args.url:
        return go(args.url.rstrip("/"))
    from app.server.app import create_app
    from app.server.settings import Settings

    overrides = {"model_store": args.model_store, "model": args.model, "device": args.device}
    settings = Settings(
        **{k: v for k, v in overrides.items() if v is not None},
        max_batch_images=max(64, args.n, args.concurrency),
        max_images_per_request=max(64, args.n),
    )
    with serve_in_thread(create_app(settings)) as url:
        return go(url)


if __name__ == "__main__":
    raise SystemExit(run())
