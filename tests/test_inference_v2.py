"""The Open Inference Protocol V2 front end, driven by the official `tritonclient.http` (binary tensors by
default) and by raw HTTP against a real `pixelcnn serve`: health, metadata, infer equal to /likelihood,
the generate extension equal to /sample, and every bad input a 4xx `{"error": "..."}` with the server
still healthy."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from app.imaging import png_bytes
from tests.helpers import png_tensor, serving


@pytest.fixture(scope="module")
def server(server_store):
    with serving(server_store, {"PIXELCNN_MODEL": "gray"}) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield url, http


@pytest.fixture
def client(server):
    client = triton.InferenceServerClient(server[0].removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture
def http(server):
    return server[1]


def images(n: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, channels, 8, 8), dtype=np.uint8)


def likelihood(http: httpx.Client, batch: np.ndarray, **fields) -> list[dict]:
    files = [("image", png_bytes(image)) for image in batch]
    response = http.post("/likelihood", files=files, data={k: str(v) for k, v in fields.items()})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def image_input(batch: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def assert_v2_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("gray") and client.is_model_ready("cond", model_version="1")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "pixelcnn-server" and "binary_tensor_data" in server["extensions"]
    cond = client.get_model_metadata("cond")
    assert cond["name"] == "cond" and cond["versions"] == ["1"]
    assert cond["inputs"] == [
        {"name": "IMAGE", "datatype": "UINT8", "shape": [-1, 1, 8, 8]},
        {"name": "LABEL", "datatype": "INT64", "shape": [-1]},
    ]
    assert cond["outputs"] == [
        {"name": "LOG_PROB", "datatype": "FP64", "shape": [-1]},
        {"name": "BITS_PER_DIM", "datatype": "FP32", "shape": [-1]},
        {"name": "PER_PIXEL_NLL", "datatype": "FP32", "shape": [-1, 1, 8, 8]},
    ]
    rgb = client.get_model_metadata("rgb", model_version="1")
    assert [spec["name"] for spec in rgb["inputs"]] == ["IMAGE"] and rgb["inputs"][0]["shape"] == [-1, 3, 8, 8]
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="no version '2'"):
        client.get_model_metadata("gray", model_version="2")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_likelihood(client, http, binary):
    batch = images(5, channels=3, seed=1)
    result = client.infer("rgb", [image_input(batch, binary)])  # default outputs, binary unless asked otherwise
    expected = likelihood(http, batch, model="rgb")
    bits, log_prob = result.as_numpy("BITS_PER_DIM"), result.as_numpy("LOG_PROB")
    assert bits.dtype == np.float32 and log_prob.dtype == np.float64 and bits.shape == log_prob.shape == (5,)
    assert result.as_numpy("PER_PIXEL_NLL") is None  # only when asked for
    for k, want in enumerate(expected):
        assert abs(float(bits[k]) - want["bits_per_dim"]) <= 1e-6
        assert abs(-float(log_prob[k]) - want["nll_nats"]) <= 1e-9 * max(1.0, want["nll_nats"])


def test_infer_per_pixel_and_labels(client, http):
    batch = images(3, seed=2)
    labels = np.array([0, 2, 1], dtype=np.int64)
    label = triton.InferInput("LABEL", [3], "INT64")
    label.set_data_from_numpy(labels)
    outputs = [triton.InferRequestedOutput("PER_PIXEL_NLL"), triton.InferRequestedOutput("LOG_PROB", binary_data=False)]
    result = client.infer("cond", [image_input(batch), label], outputs=outputs)
    expected = likelihood(http, batch, model="cond", label=",".join(map(str, labels)), per_pixel="true")
    per_pixel = result.as_numpy("PER_PIXEL_NLL")
    assert per_pixel.shape == (3, 1, 8, 8) and per_pixel.dtype == np.float32
    for k, want in enumerate(expected):
        assert -result.as_numpy("LOG_PROB")[k] == pytest.approx(want["nll_nats"], rel=1e-9)
        np.testing.assert_allclose(per_pixel[k, 0], want["per_pixel_nll"], atol=1e-5)
    assert result.get_output("LOG_PROB")["data"]  # asked for as JSON
    # Without LABEL: the exact marginal over classes, as /likelihood without a label.
    marginal = client.infer("cond", [image_input(batch)]).as_numpy("BITS_PER_DIM")
    np.testing.assert_allclose(marginal, [r["bits_per_dim"] for r in likelihood(http, batch, model="cond")], atol=1e-6)


def test_wrong_datatype_or_shape_gets_a_clear_error(client, http):
    as_float = triton.InferInput("IMAGE", [2, 1, 8, 8], "FP32")
    as_float.set_data_from_numpy(images(2).astype(np.float32))
    with pytest.raises(InferenceServerException, match=r"IMAGE must be UINT8 of shape \[-1, 1, 8, 8\]") as caught:
        client.infer("gray", [as_float])
    assert caught.value.status() == "400" and "got FP32 of shape [2, 1, 8, 8]" in caught.value.message()
    with pytest.raises(InferenceServerException, match=r"got UINT8 of shape \[2, 1, 4, 4\]"):
        client.infer("gray", [image_input(np.zeros((2, 1, 4, 4), dtype=np.uint8))])
    with pytest.raises(InferenceServerException, match="unknown input LABEL: model 'gray' takes IMAGE"):
        label = triton.InferInput("LABEL", [2], "INT64")
        label.set_data_from_numpy(np.zeros(2, dtype=np.int64))
        client.infer("gray", [image_input(images(2)), label])
    assert client.is_server_ready()


def raw_infer(http: httpx.Client, header: dict, binary: bytes = b"", length: int | None = None, model: str = "gray"):
    text = json.dumps(header).encode()
    headers = (
        {"Inference-Header-Content-Length": str(len(text) if length is None else length)} if binary or length else {}
    )
    return http.post(f"/v2/models/{model}/infer", content=text + binary, headers=headers)


def image_header(n: int = 2, **parameters) -> dict:
    return {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [n, 1, 8, 8], "parameters": parameters}]}


def test_bad_infer_requests(http):
    raw = images(2).tobytes()
    cases = [
        (raw_infer(http, image_header(binary_data_size=128), raw[:100]), "only 100 bytes of binary data are left"),
        (
            raw_infer(http, image_header(binary_data_size=128), raw, length=10_000),
            "Inference-Header-Content-Length is 10000",
        ),
        (raw_infer(http, image_header(binary_data_size=128), raw + b"xx"), "130 bytes of binary data follow"),
        (raw_infer(http, image_header(binary_data_size=100), raw), "binary_data_size is 100, but UINT8 of shape"),
        (
            raw_infer(
                http, {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [1.5] * 64}]}
            ),
            "UINT8 data must be integers",
        ),
        (
            raw_infer(
                http, {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [300] * 64}]}
            ),
            "values must be in 0..255",
        ),
        (
            raw_infer(
                http, {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [1] * 63}]}
            ),
            "has 64 elements, data has 63",
        ),
        (
            raw_infer(http, {"inputs": [{"name": "IMAGE", "datatype": "UINT4", "shape": [1], "data": [1]}]}),
            "datatype must be one of",
        ),
        (raw_infer(http, {"inputs": []}), 'non-empty "inputs" list'),
        (http.post("/v2/models/gray/infer", content=b"{not json"), "not valid JSON"),
        (
            raw_infer(http, {**image_header(binary_data_size=128), "outputs": [{"name": "SAMPLES"}]}, raw),
            "unknown output SAMPLES: model 'gray' has LOG_PROB, BITS_PER_DIM, PER_PIXEL_NLL",
        ),
        (
            raw_infer(http, {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [0, 1, 8, 8], "data": []}]}),
            "IMAGE holds 0 images",
        ),
    ]
    for response, fragment in cases:
        assert_v2_error(response, 400, fragment)
    labels = {"name": "LABEL", "datatype": "INT64", "shape": [2], "data": [0, 7]}
    header = image_header(binary_data_size=128)
    header["inputs"].append(labels)
    assert_v2_error(raw_infer(http, header, raw, model="cond"), 400, "LABEL values must be class indices 0..2, got 7")
    assert_v2_error(http.get("/v2/models/nope"), 404, "unknown model 'nope'; available models: cond, gray, rgb")
    assert_v2_error(http.get("/v2/nothing"), 404, "no route GET /v2/nothing")
    ok = raw_infer(http, image_header(binary_data_size=128), raw)
    assert ok.status_code == 200 and [out["name"] for out in ok.json()["outputs"]] == ["LOG_PROB", "BITS_PER_DIM"]
    assert http.get("/v2/health/ready").status_code == 200


def test_generate_extension_equals_sample(http):
    fields = {"n": 2, "label": "sneaker", "seed": 9, "temperature": 0.8}
    sample = http.post("/sample", json={"model": "cond", **fields}).json()
    generated = http.post("/v2/models/cond/generate", json=fields)
    assert generated.status_code == 200, generated.text
    body = generated.json()
    assert body["model_name"] == "cond" and body["model_version"] == "1"
    assert [i["png"] for i in body["images"]] == [i["png"] for i in sample["images"]]
    with http.stream("POST", "/v2/models/cond/generate_stream", json=fields) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [event["row"] for event in events[:-1]] == list(range(8))
    assert [i["png"] for i in events[-1]["images"]] == [i["png"] for i in sample["images"]]
    final = torch.stack([png_tensor(i["png"]) for i in sample["images"]])
    assert torch.equal(torch.tensor(events[3]["pixels"], dtype=torch.uint8), final[:, :, 3])
    assert_v2_error(http.post("/v2/models/cond/generate", json={"label": "unicorn"}), 400, "unknown label 'unicorn'")
    assert_v2_error(http.post("/v2/models/gray/generate", json={"n": 0}), 400, "n: must be at least 1")
    assert_v2_error(http.post("/v2/models/gray/generate", json={"stream": True}), 400, "/generate_stream")
