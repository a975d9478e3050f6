"""A small synchronous client for the PixelCNN HTTP server.

    from app.client import PixelCNNClient, write_pngs
    with PixelCNNClient("http://localhost:8000") as client:
        result = client.sample(n=4, label="sneaker", seed=1)
        write_pngs(result, "out")                      # out/image-0.png ...
        for event in client.stream_sample(n=1):       # row dicts, then the final result
            ...

Error responses raise PixelCNNError(status, type, message); the server's error format is
{"error": {"type", "message", "field"?}}.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

ImageInput = bytes | str | Path


class PixelCNNError(Exception):
    """An error answer from the server (or an `error` event in a stream)."""

    def __init__(
        self, status: int, type: str, message: str, field: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.field = field
        self.retry_after = retry_after


# How long the client keeps an idle connection for the next request: under the server's own idle limit
# (PIXELCNN_KEEP_ALIVE_TIMEOUT_S, 5 s), or a request sent as the server closes the connection is lost
# ("server disconnected without sending a response"; httpx's default is those same 5 s).
KEEPALIVE_S = 2.0


class PixelCNNClient:
    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        api_key: str | None = None,
        timeout: float = 120.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        """`http_client` replaces the internal httpx.Client (e.g. Starlette's TestClient); base_url and
        timeout are then the given client's."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if http_client is None:
            limits = httpx.Limits(keepalive_expiry=KEEPALIVE_S)
            self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, limits=limits)
            self._owned = True
        else:
            self._http, self._owned = http_client, False
            self._http.headers.update(headers)

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> PixelCNNClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Service state.

    def health(self) -> dict:
        return self._json(self._http.get("/health"))

    def ready(self) -> dict:
        """The /ready body; raises PixelCNNError (503 not_ready) while the server is not ready."""
        return self._json(self._http.get("/ready"))

    def models(self) -> list[dict]:
        return self._json(self._http.get("/models"))

    # Generation.

    def sample(
        self, n: int = 1, label: Any = None, temperature: float = 1.0, seed: int | None = None, model: str | None = None
    ) -> dict:
        """JSON result: seed, images [{png (base64), label, label_name, log_prob}], bits_per_dim, ..."""
        return self._json(
            self._http.post("/sample", json=_fields(model=model, n=n, label=label, temperature=temperature, seed=seed))
        )

    def sample_png(
        self, n: int = 1, label: Any = None, temperature: float = 1.0, seed: int | None = None, model: str | None = None
    ) -> tuple[bytes, int]:
        """(PNG bytes, seed): one image, or a grid of n."""
        body = _fields(model=model, n=n, label=label, temperature=temperature, seed=seed)
        response = self._http.post("/sample", json=body, headers={"Accept": "image/png"})
        self._check(response)
        return response.content, int(response.headers["X-Seed"])

    def stream_sample(
        self, n: int = 1, label: Any = None, temperature: float = 1.0, seed: int | None = None, model: str | None = None
    ) -> Iterator[dict]:
        """Yields {"row": i, "pixels": n x C x W} as each row is generated, then the final result dict."""
        body = _fields(model=model, n=n, label=label, temperature=temperature, seed=seed, stream=True)
        yield from self._stream("POST", "/sample", json=body)

    def complete(
        self,
        image: ImageInput,
        rows: int | None = None,
        n: int = 1,
        label: Any = None,
        temperature: float = 1.0,
        seed: int | None = None,
        model: str | None = None,
        label_mode: str | None = None,
        pixels: int | None = None,
    ) -> dict:
        """Keep the top `rows` rows of `image` (bytes of an image file, or its path) and generate the rest;
        `pixels` instead keeps that many pixels in raster order (the kept part may end mid-row).
        Without `label`, a conditional model draws each image's class from p(class | kept rows) (reported
        as class_probabilities) or, with label_mode="prior", uniformly."""
        data = _form(
            model=model,
            rows=rows,
            n=n,
            label=label,
            temperature=temperature,
            seed=seed,
            label_mode=label_mode,
            pixels=pixels,
        )
        return self._json(self._http.post("/complete", data=data, files=[_file("image", image)]))

    def stream_complete(
        self,
        image: ImageInput,
        rows: int | None = None,
        n: int = 1,
        label: Any = None,
        temperature: float = 1.0,
        seed: int | None = None,
        model: str | None = None,
        label_mode: str | None = None,
        pixels: int | None = None,
    ) -> Iterator[dict]:
        data = _form(
            model=model,
            rows=rows,
            n=n,
            label=label,
            temperature=temperature,
            seed=seed,
            label_mode=label_mode,
            pixels=pixels,
            stream=True,
        )
        yield from self._stream("POST", "/complete", data=data, files=[_file("image", image)])

    # Scoring.

    def likelihood(
        self,
        images: ImageInput | Sequence[ImageInput],
        label: Any = None,
        per_pixel: bool = False,
        model: str | None = None,
    ) -> dict:
        """{"model", "results": [{nll_nats, bits_per_dim, label, label_name, class_probabilities?, ...}]}."""
        if isinstance(images, (bytes, str, Path)):
            images = [images]
        data = _form(model=model, label=label, per_pixel=per_pixel)
        return self._json(self._http.post("/likelihood", data=data, files=[_file("image", i) for i in images]))

    # Plumbing.

    def _stream(self, method: str, url: str, **kwargs: Any) -> Iterator[dict]:
        with self._http.stream(method, url, headers={"Accept": "text/event-stream"}, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            for event, data in parse_sse(response.iter_lines()):
                payload = json.loads(data)
                if event == "row":
                    yield payload
                elif event == "done":
                    yield payload
                    return
                elif event == "error":
                    error = payload.get("error", {})
                    raise PixelCNNError(
                        response.status_code, error.get("type", "error"), error.get("message", data), error.get("field")
                    )
        raise PixelCNNError(0, "incomplete_stream", "the stream ended without a done event")

    def _json(self, response: httpx.Response) -> Any:
        self._check(response)
        return response.json()

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            error = response.json()["error"]
            type_, message, field = error["type"], error["message"], error.get("field")
        except (ValueError, KeyError, TypeError):
            type_, message, field = "http_error", response.text[:500] or response.reason_phrase, None
        retry = response.headers.get("Retry-After")
        raise PixelCNNError(
            response.status_code,
            type_,
            message,
            field,
            float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
        )


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """Server-Sent Events per the HTML spec: (event name, data) per blank-line-terminated block.

    Multi-line data is joined with newlines, comment lines (":") are skipped, the event name defaults to
    "message", and one space after the colon is dropped."""
    event, data = "message", []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)


def _fields(**fields: Any) -> dict:
    return {key: value for key, value in fields.items() if value is not None}


def _form(**fields: Any) -> dict[str, str]:
    """Form fields as strings; a list of labels becomes "a,b" (the server splits on commas)."""
    form = {}
    for key, value in _fields(**fields).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        form[key] = str(value)
    return form


def _file(field: str, image: ImageInput) -> tuple[str, tuple[str, bytes, str]]:
    if isinstance(image, (str, Path)):
        path = Path(image)
        return field, (path.name, path.read_bytes(), "application/octet-stream")
    return field, ("image.png", image, "image/png")


def png_bytes_of(result: dict, index: int = 0) -> bytes:
    """The PNG bytes of image `index` of a /sample or /complete result."""
    return base64.b64decode(result["images"][index]["png"])


def write_pngs(result: dict, directory: str | Path, stem: str = "image") -> list[Path]:
    """Write every image of a /sample or /complete result to DIRECTORY/STEM-i.png; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(result["images"])):
        path = directory / f"{stem}-{i}.png"
        path.write_bytes(png_bytes_of(result, i))
        paths.append(path)
    return paths


def write_heatmaps(result: dict, directory: str | Path, stem: str = "heatmap") -> list[Path]:
    """Write the heatmap_png of each /likelihood result (requested with per_pixel=True)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, entry in enumerate(result["results"]):
        if entry.get("heatmap_png"):
            path = directory / f"{stem}-{i}.png"
            path.write_bytes(base64.b64decode(entry["heatmap_png"]))
            paths.append(path)
    return paths
