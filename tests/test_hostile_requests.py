"""Odd requests a hostile client sends: deeply nested JSON, bodies without the API key, HEAD, arbitrary
methods, and the metrics labels they must not multiply."""

from __future__ import annotations

import pytest
import torch

from app.imaging import png_bytes
from tests.helpers import without_request_id

pytestmark = pytest.mark.anyio

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("path", ["/sample", "/complete", "/likelihood"])
async def test_deeply_nested_json_is_a_400_with_the_request_id(serve, path):
    async with serve() as (_, client):
        response = await client.post(path, content=DEEP, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = without_request_id(response.json(), response)["error"]
        assert error["type"] == "invalid_request"
        metrics = (await client.get("/metrics")).text
        assert 'reason="internal"' not in metrics


@pytest.mark.parametrize("path", ["/sample", "/complete", "/likelihood"])
@pytest.mark.parametrize("body", ["{not json", DEEP, '{"n": 1000}'])
async def test_the_api_key_is_checked_before_the_body(serve, path, body):
    async with serve(api_key="s3cret") as (_, client):
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert without_request_id(response.json(), response)["error"]["type"] == "unauthorized"
        wrong = await client.post(path, content=body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "wrong API key"
        keyed = await client.post(path, content=body, headers={"authorization": "bearer s3cret"})
        assert keyed.status_code == 400  # with the key, the body is read and found wrong


@pytest.mark.parametrize("path", ["/health", "/ready", "/models", "/models/gray", "/metrics", "/", "/static/demo.js"])
async def test_head_answers_like_get_without_a_body(serve, path):
    async with serve() as (_, client):
        get = await client.get(path)
        head = await client.head(path)
        assert get.status_code == head.status_code == 200
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        if path not in ("/metrics", "/ready"):  # their bodies change between two calls
            assert head.headers["content-length"] == str(len(get.content))
        assert (await client.head("/sample")).status_code == 405


async def test_head_is_counted_under_the_route_it_reached(serve):
    async with serve() as (_, client):
        for path in ("/models", "/models/gray", "/v2", "/static/demo.js"):
            assert (await client.head(path)).status_code == 200, path
        metrics = (await client.get("/metrics")).text
        for route in ("/models", "/models/{name}", "/v2", "/static"):
            assert f'method="HEAD",route="{route}",status="200"' in metrics, route
        assert 'method="HEAD",route="unmatched"' not in metrics


async def test_metric_labels_stay_bounded(serve):
    async with serve() as (_, client):
        for method in ("FOO", "BAR", "X" * 40, "PROPFIND"):
            assert (await client.request(method, "/health")).status_code == 405
        await client.get("/static/demo.js")
        await client.get("/static/demo.css")
        await client.get("/static/nope.js")
        await client.get("/openapi.json")
        await client.get("/docs")
        metrics = (await client.get("/metrics")).text
    requests = [line for line in metrics.splitlines() if line.startswith("pixelcnn_requests_total{")]
    assert 'pixelcnn_requests_total{method="other",route="/health",status="405"} 4.0' in requests
    assert not any("FOO" in line or "PROPFIND" in line for line in requests)
    assert 'pixelcnn_requests_total{method="GET",route="/static",status="200"} 2.0' in requests
    assert 'pixelcnn_requests_total{method="GET",route="/static",status="404"} 1.0' in requests
    assert 'pixelcnn_requests_total{method="GET",route="/openapi.json",status="200"} 1.0' in requests
    assert 'pixelcnn_requests_total{method="GET",route="/docs",status="200"} 1.0' in requests
    assert not any('route="unmatched"' in line for line in requests)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("HEAD", "/sample", "POST"),
        ("GET", "/sample", "POST"),
        ("PUT", "/likelihood", "POST"),
        ("DELETE", "/complete", "POST"),
        ("POST", "/health", "GET, HEAD"),
        ("PATCH", "/models", "GET, HEAD"),
        ("HEAD", "/v1/images/generations", "POST"),
        ("GET", "/v2/models/gray/infer", "POST"),
    ],
)
async def test_405_names_the_method_used_and_lists_the_allowed_ones(serve, method, path, allowed):
    """In each protocol's error format (ours, OpenAI's, V2's); a HEAD answer has no body, but its
    Content-Length is that of the error naming HEAD (the GET's error with the method and id swapped)."""
    async with serve() as (_, client):
        response = await client.request(method, path)
        assert response.status_code == 405
        assert response.headers["allow"] == allowed
        message = f"{method} is not allowed on {path}; allowed: {allowed}"
        if method == "HEAD":
            assert response.content == b""
            get = await client.get(path)
            body = get.text.replace(f"GET is not allowed on {path}", f"HEAD is not allowed on {path}")
            body = body.replace(get.headers["x-request-id"], response.headers["x-request-id"])
            assert message in body and response.headers["content-length"] == str(len(body.encode()))
        else:
            assert message in response.text, response.text


async def test_404_names_the_method_used(serve):
    async with serve() as (_, client):
        head = await client.head("/nope")
        get = await client.get("/nope")
        assert head.status_code == get.status_code == 404
        assert get.json()["error"]["message"] == "no route GET /nope; see /docs for the API"
        body = get.text.replace("no route GET", "no route HEAD").replace(get.headers["x-request-id"], "x" * 32)
        assert head.headers["content-length"] == str(len(body.encode()) - 32 + len(head.headers["x-request-id"]))


def error_message(response) -> str:
    """The message of an error in any front end's format (native and OpenAI: an object; V2: a string)."""
    error = response.json()["error"]
    return error if isinstance(error, str) else error["message"]


JSON_ROUTES = ["/sample", "/complete", "/likelihood", "/v1/images/generations", "/v2/models/gray/generate"]


@pytest.mark.parametrize("path", [*JSON_ROUTES, "/v2/models/gray/infer"])
@pytest.mark.parametrize(
    "body,reason",
    [
        (DEEP, "is JSON nested too deeply; expected a flat object"),
        (b'{"n": ' + b"9" * 5000 + b"}", "has a number of more than 4300 digits"),
        (b'{"label": "\xff"}', "is not UTF-8 text, as JSON must be"),
        (b'{"n": 1,}', "is not valid JSON (Expecting property name enclosed in double quotes at character 8)"),
    ],
)
async def test_json_that_cannot_be_read_gets_one_reason_on_every_route(serve, path, body, reason):
    """Not FastAPI's "There was an error parsing the body" on some routes, a 500 on others: the reason."""
    async with serve() as (_, client):
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert reason in error_message(response), response.text
        assert 'reason="internal"' not in (await client.get("/metrics")).text


@pytest.mark.parametrize(
    "length,message",
    [
        ("\u00b2", "must be a byte count, got '\u00b2'"),  # a digit to str.isdigit, not to int()
        ("1" * 4301, "must be a byte count, got '1111"),
        ("0", "is 0: it must count the JSON header's bytes, at least 1"),
        ("999", "is 999, but the body has"),
    ],
)
async def test_the_v2_header_length_is_a_plain_byte_count(serve, length, message):
    async with serve() as (_, client):
        response = await client.post(
            "/v2/models/gray/infer",
            content=b'{"inputs": []}',
            headers={"content-type": "application/json", "inference-header-content-length": length.encode("latin-1")},
        )
        assert response.status_code == 400, response.text
        assert message in error_message(response)


@pytest.mark.parametrize("path", [*JSON_ROUTES, "/v2/models/gray/infer", "/v1/images/edits"])
async def test_a_compressed_body_is_refused_on_every_route(serve, path):
    async with serve() as (_, client):
        response = await client.post(
            path, content=b'{"n": 1}', headers={"content-type": "application/json", "content-encoding": "gzip"}
        )
        assert response.status_code == 415, response.text
        assert "Content-Encoding 'gzip' is not supported: send the body uncompressed" in error_message(response)
        identity = {"content-type": "application/json", "content-encoding": "identity"}
        plain = await client.post("/sample", content=b'{"n": 1}', headers=identity)
        assert plain.status_code == 200, plain.text


@pytest.mark.parametrize("path", ["/complete", "/likelihood", "/v1/images/edits"])
async def test_an_upload_cut_short_is_named_as_such(serve, path):
    """The parser keeps the parts before a cut and drops the rest: without the check, a cut image is
    "no image given"."""
    whole = (
        b'--abc\r\nContent-Disposition: form-data; name="image"; filename="top.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n-- the rest never came"
    )
    async with serve() as (_, client):
        headers = {"content-type": "multipart/form-data; boundary=abc"}
        response = await client.post(path, content=whole, headers=headers)
        assert response.status_code == 400, response.text
        assert "the multipart body ends before its closing boundary b'--abc--'" in error_message(response)
        nothing = await client.post(path, content=b"--abc--\r\n", headers=headers)
        assert nothing.status_code == 400 and "no image given" in error_message(nothing), nothing.text
        mangled = await client.post(path, content=b"junk --abc-- junk", headers={"content-type": "multipart/form-data"})
        assert mangled.status_code == 400, mangled.text
        assert "send it as curl does: -F name=value -F image=@picture.png" in error_message(mangled)


@pytest.mark.parametrize("label", ["\u00b2", "\u0667", "\u2460"])  # superscript 2, Arabic-Indic 7, circled 1
async def test_a_label_is_an_ascii_index_or_a_name(serve, label):
    """int() reads these as digits (or fails with Python's words); a label is 0..9 or a class name."""
    async with serve(model="cond") as (_, client):
        response = await client.post("/sample", json={"label": label})
        assert response.status_code == 400, response.text
        assert f"unknown label {label!r}: expected a class index 0..2 or a class name" in error_message(response)
        prompt = await client.post("/v1/images/generations", json={"prompt": label})
        assert prompt.status_code == 400 and "expected a class index 0..2" in error_message(prompt), prompt.text


async def test_errors_do_not_echo_a_clients_megabytes(serve):
    async with serve(model="cond") as (_, client):
        fields = await client.post("/sample", json={f"field{i}": 1 for i in range(20_000)})
        assert fields.status_code == 400
        message = error_message(fields)
        assert len(message) < 300 and message.endswith("; and 19995 more"), message[:400]
        assert message.startswith("field0: unknown field; field1: unknown field;")
        for body in ({"model": "m" * 100_000}, {"label": "l" * 100_000}):
            response = await client.post("/sample", json=body)
            assert response.status_code in (400, 404) and len(error_message(response)) < 400, response.text[:400]
            assert "..." in error_message(response)


async def test_v2_generate_takes_the_version_and_names_an_unknown_model_first(serve):
    """Triton's generate extension has [/versions/{v}] as infer has; a wrong model is a 404 whatever the body."""
    async with serve() as (_, client):
        plain = await client.post("/v2/models/gray/generate", json={"seed": 3})
        versioned = await client.post("/v2/models/gray/versions/1/generate", json={"seed": 3})
        assert plain.status_code == versioned.status_code == 200, versioned.text
        assert plain.json()["images"] == versioned.json()["images"]
        stream = await client.post("/v2/models/gray/versions/1/generate_stream", json={"seed": 3})
        assert stream.status_code == 200 and stream.text.count("data: ") == 8 + 1, stream.text[:200]
        for path in ("/v2/models/nope/generate", "/v2/models/gray/versions/2/generate_stream"):
            response = await client.post(path, json={"n": 0})
            assert response.status_code == 404, response.text


@pytest.mark.parametrize(
    "parameters,boundary",
    [
        ("boundary=abc; x*; x*1", b"abc"),  # RFC 2231 pieces the stdlib's email parser trips on
        ("boundary=abc; boundary=xyz", b"xyz"),  # the form parser takes the last: the check must too
        ('boundary="a b:c=d"', b"a b:c=d"),
        ("BOUNDARY=xyz; charset=utf-8", b"xyz"),
    ],
)
async def test_the_closing_boundary_is_looked_for_as_the_form_parser_reads_it(serve, parameters, boundary):
    part = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    image = png_bytes(torch.zeros(1, 8, 8, dtype=torch.uint8))
    body = b"--" + boundary + b"\r\n" + part + image + b"\r\n--" + boundary + b"--\r\n"
    async with serve() as (_, client):
        response = await client.post(
            "/likelihood", content=body, headers={"content-type": f"multipart/form-data; {parameters}"}
        )
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("coding", ["identity, identity", " Identity ", ""])
async def test_identity_in_any_spelling_is_no_coding(serve, coding):
    async with serve() as (_, client):
        response = await client.post(
            "/sample", content=b'{"n": 1}', headers={"content-type": "application/json", "content-encoding": coding}
        )
        assert response.status_code == 200, response.text
        listed = {"content-type": "application/json", "content-encoding": "identity, gzip"}
        assert (await client.post("/sample", content=b'{"n": 1}', headers=listed)).status_code == 415


async def test_a_v2_version_is_not_echoed_whole(serve):
    async with serve() as (_, client):
        response = await client.post("/v2/models/gray/versions/" + "v" * 20_000 + "/generate", json={})
        assert response.status_code == 404 and len(error_message(response)) < 200, len(response.text)
