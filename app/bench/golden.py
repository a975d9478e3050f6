"""Golden seeded outputs: fixed seeded requests to a real server, their images and log-probs as fingerprints.

    pixelcnn bench golden [--write] [--file tests/golden/seeded-outputs.json] [--model-store model_store]
                          [--lanes 1,2] [--against FILE ...]

Starts `pixelcnn serve` of the model store (CPU, default settings) once per lane count, sends every case
(`cases`: /sample and /complete of each shipped model, OpenAI's /v1/images/generations and V2's generate),
first one at a time, then all of a model's cases at once so that they share decode steps (other batch
sizes), and records per image the SHA-256 of its decoded pixels (uint8, H x W or H x W x C, as the PNG
decodes), its log_prob as float.hex() (a bit-for-bit fingerprint) and the X-Numerics header.

Without --write it compares what the servers return with --file (and with each --against file, e.g. one
made on another machine, case by case over the cases that file has): it prints how many cases match,
names the first that differs, and exits 1 on any difference. With --write it writes --file, after
checking that every lane count and both orders gave the same bytes (else it writes nothing and exits 1).

Regenerate the file (`pixelcnn bench golden --write`) only in a commit that changes seeded outputs on
purpose (a new checkpoint, a protocol change), and say why in that commit.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import platform
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FILE = ROOT / "tests" / "golden" / "seeded-outputs.json"
DEFAULT_STORE = ROOT / "model_store"
COMMAND = "pixelcnn bench golden --write"

# Seeded requests per model: every sampling option once (no label, a label by index and by name,
# temperatures below and above 1, a seed above 2^32) at 1 .. 16 images.
SAMPLE_REQUESTS: list[dict[str, Any]] = [
    {"n": 4, "seed": 0, "temperature": 1.0},
    {"n": 8, "seed": 1, "temperature": 1.0, "label": 7},
    {"n": 16, "seed": 2, "temperature": 0.7, "label": "Dress"},
    {"n": 1, "seed": 3, "temperature": 1.3, "label": 9},
    {"n": 2, "seed": 12345678901, "temperature": 1.0, "label": 0},
]
# Completions of Fashion-MNIST test images (known rows run through the prefill); one without a label (its
# class drawn from p(class | kept rows)) and one whose kept pixels end mid-row.
COMPLETE_REQUESTS: list[dict[str, Any]] = [
    {"test_image": 5, "rows": 14, "n": 2, "seed": 5, "label": 3},
    {"test_image": 6, "rows": 20, "n": 2, "seed": 6, "label": 3},
    {"test_image": 7, "rows": 3, "n": 2, "seed": 7, "label": 3},
    {"test_image": 8, "rows": 10, "n": 3, "seed": 8},
    {"test_image": 9, "pixels": 12 * 28 + 9, "n": 2, "seed": 9, "label": 3},  # kept pixels end mid-row
]
# The other front ends on the same engine: the OpenAI Images API (prompt = class name) and V2's generate
# extension (/sample's fields, the model in the path).
OPENAI_GENERATIONS = "/v1/images/generations"
V2_GENERATE = "/v2/models/{model}/generate"
OPENAI_REQUEST: dict[str, Any] = {"prompt": "Sneaker", "n": 3, "seed": 11}
V2_REQUEST: dict[str, Any] = {"n": 2, "seed": 12, "label": "Bag", "temperature": 0.9}


@dataclass(frozen=True)
class Case:
    route: str
    request: dict[str, Any]

    @property
    def key(self) -> str:
        return self.route + " " + json.dumps(self.request, sort_keys=True)


def shipped_models(store: Path) -> list[str]:
    return sorted(folder.name for folder in store.iterdir() if (folder / "config.json").is_file())


def cases(models: list[str]) -> list[Case]:
    out = []
    for model in models:
        out += [Case("/sample", {"model": model, **request}) for request in SAMPLE_REQUESTS]
        out += [Case("/complete", {"model": model, **request}) for request in COMPLETE_REQUESTS]
        out += [
            Case(OPENAI_GENERATIONS, {"model": model, **OPENAI_REQUEST}),
            Case(V2_GENERATE, {"model": model, **V2_REQUEST}),
        ]
    return out


def png_pixels(png: bytes) -> np.ndarray:
    """uint8 pixels of a PNG as the server drew them: H x W (grayscale) or H x W x C."""
    return np.asarray(Image.open(io.BytesIO(png)))


def fingerprint(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def test_image_png(index: int) -> bytes:
    from app.data import load_dataset

    image = np.asarray(load_dataset("fashion-mnist", "test", limit=index + 1).images[index])  # (C, H, W) uint8
    out = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(out, format="PNG")
    return out.getvalue()


def send(client: httpx.Client, case: Case) -> list[dict[str, Any]]:
    """One case's records: route, request, image index, label, pixels_sha256, log_prob (float.hex; None
    where the front end reports none) and the X-Numerics header."""
    request = dict(case.request)
    if case.route == "/complete":
        fields = {k: str(v) for k, v in request.items() if k != "test_image"}
        files = {"image": ("image.png", test_image_png(request["test_image"]), "image/png")}
        response = client.post("/complete", data=fields, files=files)
    elif case.route == V2_GENERATE:
        model = request.pop("model")
        response = client.post(V2_GENERATE.format(model=model), json=request)
    else:
        response = client.post(case.route, json=request)
    if response.status_code != 200:
        raise RuntimeError(f"{case.key}: HTTP {response.status_code}: {response.text[:500]}")
    body = response.json()
    if case.route == OPENAI_GENERATIONS:  # OpenAI's shape: data[].b64_json, the labels in X-Labels
        labels = [int(v) for v in response.headers["x-labels"].split(",")]
        images = [{"png": d["b64_json"], "label": label} for d, label in zip(body["data"], labels)]
    else:
        images = body["images"]
    return [
        {
            "route": case.route,
            "request": case.request,
            "image": index,
            "label": image.get("label"),
            "pixels_sha256": fingerprint(png_pixels(base64.b64decode(image["png"]))),
            "log_prob": float(image["log_prob"]).hex() if "log_prob" in image else None,
            "numerics": response.headers.get("x-numerics"),
        }
        for index, image in enumerate(images)
    ]


def collect(url: str, all_cases: list[Case], concurrent: bool) -> list[dict[str, Any]]:
    """Every case's records, in case order; `concurrent`: each model's cases sent at once."""
    with httpx.Client(base_url=url, timeout=600) as client:
        if not concurrent:
            return [record for case in all_cases for record in send(client, case)]
        by_model: dict[str, list[Case]] = {}
        for case in all_cases:
            by_model.setdefault(case.request["model"], []).append(case)
        results: dict[str, list[dict[str, Any]]] = {}
        for model_cases in by_model.values():
            with ThreadPoolExecutor(len(model_cases)) as pool:
                for case, records in zip(model_cases, pool.map(lambda c: send(client, c), model_cases)):
                    results[case.key] = records
        return [record for case in all_cases for record in results[case.key]]


def record_key(record: dict[str, Any]) -> str:
    return f"{record['route']} {json.dumps(record['request'], sort_keys=True)} image {record['image']}"


def differences(expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(image key, what differs) per differing image, in the expected file's order, over the images it
    has; an image the actual run lacks is a difference too."""
    got = {record_key(r): r for r in actual}
    out = []
    for want in expected:
        key = record_key(want)
        have = got.get(key)
        if have is None:
            out.append((key, "missing"))
            continue
        fields = [f for f in ("label", "pixels_sha256", "log_prob", "numerics") if f in want and have[f] != want[f]]
        if fields:
            out.append((key, "; ".join(f"{f} {have[f]} != expected {want[f]}" for f in fields)))
    return out


@contextmanager
def serving(store: Path, lanes: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real `pixelcnn serve` of `store` on the CPU with `lanes` decode lanes; yields its URL."""
    from app.bench.gateway import Replica

    replica = Replica(store, Path(tempfile.mkdtemp(prefix="pixelcnn-golden-")), env=env, lanes=lanes)
    try:
        replica.wait_ready(180)
        yield replica.url
    finally:
        replica.stop()


def run_all(store: Path, lanes: list[int], env: dict[str, str] | None = None) -> tuple[list[dict], list[str]]:
    """Records of the first run, and what every other run (lane count x order) had that differed."""
    all_cases = cases(shipped_models(store))
    first: list[dict[str, Any]] | None = None
    disagreements: list[str] = []
    for lane_count in lanes:
        with serving(store, lane_count, env) as url:
            for concurrent in (False, True):
                records = collect(url, all_cases, concurrent)
                label = f"{lane_count} lane(s), {'all at once' if concurrent else 'one at a time'}"
                print(f"{label}: {len(records)} images")
                if first is None:
                    first = records
                else:
                    disagreements += [f"{label}: {key}: {what}" for key, what in differences(first, records)]
    assert first is not None
    return first, disagreements


def document(records: list[dict[str, Any]]) -> str:
    """The golden file's text: what it is, where it was written, then one image per line (readable diffs)."""
    header = {
        "generated_by": COMMAND,
        "about": "SHA-256 of each image's uint8 pixels (as its PNG decodes: H x W, or H x W x C) and its log_prob "
        "as float.hex(), for fixed seeded requests to `pixelcnn serve` of model_store/ on the CPU; the same from "
        "1 and 2 lanes, at any batch, on any x86-64 CPU (numerics 'portable'). Regenerate only when seeded "
        "outputs change on purpose, in the commit that changes them, and say why.",
        "written_on": {"cpu": cpu_name(), "arch": platform.machine()},
    }
    lines = [json.dumps(record, sort_keys=True) for record in records]
    head = json.dumps(header, indent=1)[:-2]  # without the closing brace
    return head + ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(name: str, expected: list[dict[str, Any]], records: list[dict[str, Any]]) -> bool:
    """Print how many of `expected`'s images and cases this run reproduced, and the first difference."""
    found = differences(expected, records)
    images = len(expected)
    n_cases = len({(r["route"], json.dumps(r["request"], sort_keys=True)) for r in expected})
    bad_cases = {key.rsplit(" image ", 1)[0] for key, _ in found}
    pixels = sum("pixels_sha256" in what or what == "missing" for _, what in found)
    print(
        f"{name}: {images - len(found)}/{images} images and {n_cases - len(bad_cases)}/{n_cases} cases identical "
        f"({pixels} images with other pixels)"
    )
    if found:
        print(f"  first difference: {found[0][0]}: {found[0][1]}")
    return not found


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pixelcnn bench golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the golden file (default %(default)s)")
    parser.add_argument(
        "--model-store", type=Path, default=DEFAULT_STORE, help="the models to serve (default: the shipped model_store)"
    )
    parser.add_argument("--lanes", default="1,2", help="decode lane counts to serve with (default 1,2)")
    parser.add_argument("--write", action="store_true", help="write --file from this machine's outputs")
    parser.add_argument("--against", type=Path, action="append", default=[], help="also compare with this file")
    args = parser.parse_args(argv)
    lanes = [int(v) for v in args.lanes.split(",")]
    records, disagreements = run_all(args.model_store, lanes)
    if disagreements:
        print(f"runs disagree ({len(disagreements)} images); first: {disagreements[0]}")
        return 1
    if args.write:
        args.file.parent.mkdir(parents=True, exist_ok=True)
        args.file.write_text(document(records))
        print(f"wrote {args.file}: {len(records)} images")
        return 0
    ok = True
    for path in [args.file, *args.against]:
        ok = report(str(path), json.loads(path.read_text())["cases"], records) and ok
    return 0 if ok else 1
