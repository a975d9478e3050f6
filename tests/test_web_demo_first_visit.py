"""The web demo as a first-time visitor meets it (Chromium, a real `pixelcnn serve`; fixtures from
test_web_demo): a failure says what happened and leaves no stale result; fields follow the server's limits
and are refused in the page in the server's words; slow motion; each result can be downloaded and replayed
as a curl command; the test-image picker follows an upload; the class names fit their drop-down."""

# ruff: noqa: F811  (the fixtures imported from test_web_demo are parameters here)
from __future__ import annotations

import base64
import json
import subprocess
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from tests.test_web_demo import (  # noqa: F401
    EXAMPLES,
    SCREENSHOTS,
    browser,
    fill_generation_form,
    gray,
    png_pixels,
    server,
    visit,
)

pytestmark = pytest.mark.slow


def sample_requests(visit) -> list[str]:
    return [url for url in visit.requests if urlsplit(url).path == "/sample"]


def test_a_failed_request_leaves_no_stale_images_or_stats_and_says_why(visit, server):
    page = visit.page
    visit.open("sample")
    fill_generation_form(page, "#sample-form", n=2, seed=3)
    page.click("#sample-form [data-start]")
    assert visit.wait_for_outcome("sample") == "done"
    assert page.locator("#view-sample [data-gallery] canvas").count() == 2

    said = httpx.post(f"{server}/sample", json={"seed": -1}).json()["error"]["message"]
    page.evaluate("delete document.getElementById('view-sample').dataset.outcome")
    fill_generation_form(page, "#sample-form", seed=-1)  # the page leaves seeds to the server
    page.click("#sample-form [data-start]")
    assert visit.wait_for_outcome("sample") == "error"
    assert page.inner_text("#view-sample .error") == said
    assert page.locator("#view-sample [data-gallery] canvas").count() == 0
    assert "request failed" in page.inner_text("#view-sample [data-gallery]")
    stats = page.inner_text("#view-sample .stats")
    assert "failed" in stats and "…" not in stats and "/ 28" not in stats, stats
    page.screenshot(path=SCREENSHOTS / "sample-error-desktop.png", full_page=True)


@pytest.mark.parametrize(
    ("fields", "body"),
    [
        ({"n": 65}, {"n": 65}),
        ({"temperature": 50}, {"temperature": 50}),
        ({"temperature": 0.01}, {"temperature": 0.01}),
    ],
)
def test_out_of_range_fields_are_refused_in_the_page_in_the_servers_words(visit, server, fields, body):
    page = visit.page
    visit.open("sample")
    limits = httpx.get(f"{server}/limits").json()
    assert page.get_attribute("#sample-form [name=n]", "max") == str(limits["max_images_per_request"])
    assert page.get_attribute("#complete-form [name=n]", "max") == str(limits["max_images_per_request"])
    said = httpx.post(f"{server}/sample", json=body).json()["error"]["message"]
    fill_generation_form(page, "#sample-form", **fields)
    page.click("#sample-form [data-start]")
    assert visit.wait_for_outcome("sample") == "error"
    assert page.inner_text("#view-sample .error") == said
    assert sample_requests(visit) == []  # refused before sending


def test_junk_typed_in_a_number_field_is_refused_not_replaced_by_the_default(visit, server):
    page = visit.page
    visit.open("sample")
    said = httpx.post(f"{server}/sample", json={"temperature": "1e"}).json()["error"]["message"]
    page.fill("#sample-form [name=temperature]", "")
    page.locator("#sample-form [name=temperature]").press_sequentially("1e")
    page.click("#sample-form [data-start]")
    assert visit.wait_for_outcome("sample") == "error"
    assert page.inner_text("#view-sample .error") == said == "temperature: must be a number"
    assert sample_requests(visit) == []


def test_slow_motion_holds_each_row_so_the_drawing_can_be_watched(visit):
    page = visit.page
    visit.open("sample")
    fill_generation_form(page, "#sample-form", n=1, seed=4)
    page.check("#sample-form [data-slow]")
    started = time.monotonic()
    page.click("#sample-form [data-start]")
    page.wait_for_function(  # part-way: some rows drawn, not all
        """() => { const c = document.querySelector("#view-sample [data-gallery] canvas");
        if (!c) return false; const d = c.getContext("2d").getImageData(0, 0, 28, 28).data;
        return d[4 * 28 * 5 + 3] === 255 && d[4 * 28 * 27 + 3] !== 255; }"""
    )
    assert visit.wait_for_outcome("sample") == "done"
    assert time.monotonic() - started >= 28 * 0.12  # 120 ms a row


def test_each_result_downloads_and_its_curl_command_replays_it(visit, server, tmp_path):
    page = visit.page
    visit.open("sample")
    fill_generation_form(page, "#sample-form", n=2, seed=21, temperature=0.9)
    page.select_option("#sample-form [name=label]", "Bag")
    page.click("#sample-form [data-start]")
    assert visit.wait_for_outcome("sample") == "done"
    drawn = [gray(c) for c in visit.canvases("#view-sample [data-gallery] canvas")]
    links = page.locator("#view-sample a.download")
    assert links.count() == 2
    for index, canvas in enumerate(drawn):
        href, name = links.nth(index).get_attribute("href"), links.nth(index).get_attribute("download")
        assert name == f"fashion-mnist-seed21-{index + 1}.png"
        assert np.array_equal(png_pixels(base64.b64decode(href.split(",", 1)[1])), canvas)
    command = page.get_attribute("#view-sample [data-curl]", "data-curl")
    assert command.startswith("curl ") and "'Content-Type: application/json'" in command
    replay = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    result = json.loads(replay.stdout)
    assert result["seed"] == 21 and [image["label_name"] for image in result["images"]] == ["Bag", "Bag"]
    for canvas, image in zip(drawn, result["images"]):
        assert np.array_equal(png_pixels(image["png"]), canvas)


def test_the_completion_curl_command_sends_the_picture_as_top_png(visit, server, tmp_path):
    page = visit.page
    visit.open("complete")
    page.select_option("#complete-example", "fashion-test-9.png")
    fill_generation_form(page, "#complete-form", n=1, seed=8)
    page.click("#complete-form [data-start]")
    assert visit.wait_for_outcome("complete") == "done"
    drawn = gray(visit.canvases("#view-complete [data-gallery] canvas")[0])
    command = page.get_attribute("#view-complete [data-curl]", "data-curl")
    assert "-F image=@top.png" in command and "-F rows='14'" in command
    (tmp_path / "top.png").write_bytes((EXAMPLES / "fashion-test-9.png").read_bytes())
    replay = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    result = json.loads(replay.stdout)
    assert np.array_equal(png_pixels(result["images"][0]["png"]), drawn)


def test_the_test_image_picker_follows_an_upload(visit):
    page = visit.page
    visit.open("complete")
    page.select_option("#complete-example", "fashion-test-9.png")
    assert page.input_value("#complete-example") == "fashion-test-9.png"
    page.set_input_files("#complete-upload", str(EXAMPLES / "fashion-test-18.png"))
    page.wait_for_function("() => document.getElementById('complete-example').value === ''")


@pytest.mark.parametrize("visit", ["desktop", "phone"], indirect=True)
def test_the_class_names_fit_their_drop_down(visit):
    page = visit.page
    for view in ("sample", "complete"):
        visit.open(view)
        fits = page.evaluate(
            """(view) => { const select = document.querySelector(`#${view}-form [name=label]`);
            const ctx = document.createElement("canvas").getContext("2d");
            ctx.font = getComputedStyle(select).font;
            const widest = Math.max(...[...select.options].map((o) => ctx.measureText(o.text).width));
            return { widest, room: select.clientWidth - 40 }; }""",  # 40 px: padding and the arrow
            view,
        )
        assert fits["widest"] <= fits["room"], (view, fits)
