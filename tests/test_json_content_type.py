"""JSON sent without a JSON Content-Type gets a 400 naming the header: with none at all (FastAPI's strict
content type, which stops cross-site form posts), or as a form (what `curl -d` sends unless told otherwise)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio


async def test_json_without_a_content_type_gets_a_400_naming_the_missing_header(serve):
    async with serve() as (_, client):
        response = await client.post("/sample", content=b'{"n": 1, "seed": 2}')
        assert "content-type" not in response.request.headers
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert "sent with Content-Type: application/json (this request has no Content-Type" in message, message
        valid = await client.post(
            "/sample", content=b'{"n": 1, "seed": 2}', headers={"content-type": "application/json"}
        )
        assert valid.status_code == 200 and valid.json()["seed"] == 2


async def test_json_sent_as_a_form_gets_a_400_naming_the_missing_header(serve):
    form = {"content-type": "application/x-www-form-urlencoded"}  # curl -d '{...}' without -H
    async with serve() as (_, client):
        for path in ("/sample", "/complete", "/likelihood", "/v1/images/generations"):
            response = await client.post(path, content=b'{"n": 1}', headers=form)
            assert response.status_code == 400, (path, response.text)
            message = response.json()["error"]["message"]
            assert "Content-Type: application/json" in message, (path, message)
            assert "'application/x-www-form-urlencoded'" in message and "curl -d" in message, (path, message)
