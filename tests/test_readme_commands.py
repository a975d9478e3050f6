"""The README's shell commands that talk to a server run as written against a real `pixelcnn serve` of the
shipped models, so the README cannot rot: every command in a ```sh block that names the server's address
(curl, the CLI's --url, pipelines into curl), in order, in one folder (the earlier ones make the files the
later ones use: top.png, done.png), each exiting 0 with curl failing on any HTTP error."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import serving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ADDRESS = re.compile(r"(?:http://)?(?:localhost|127\.0\.0\.1):8000")
# Benchmarks that run for minutes against a server: documented, measured elsewhere, not run here.
SKIPPED_PREFIXES = ("pixelcnn bench",)


def shell_commands(markdown: str) -> list[str]:
    """Commands of the ```sh blocks, one per entry: continuation lines (a trailing backslash or pipe, or a
    quote still open) joined, comment lines dropped."""
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, flags=re.S):
        pending = ""
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending = f"{pending}\n{line}" if pending else line
            if pending.rstrip().endswith(("\\", "|")):
                continue
            try:
                shlex.split(pending, comments=True)
            except ValueError:  # a quote still open: the command goes on
                continue
            commands.append(pending)
            pending = ""
    return commands


def server_commands(markdown: str) -> list[str]:
    return [c for c in shell_commands(markdown) if ADDRESS.search(c) and not c.startswith(SKIPPED_PREFIXES)]


def test_the_extraction_finds_the_readme_commands():
    commands = server_commands(README.read_text())
    assert any("/static/examples/" in c and "-o top.png" in c for c in commands)
    assert any(c.startswith("curl -s -F image=@top.png") for c in commands)
    assert any(c.startswith("pixelcnn sample --url") for c in commands)
    assert any("python -c" in c and "/v2/models/fashion-mnist/infer" in c for c in commands)
    assert not any(c.startswith("pixelcnn bench") for c in commands)
    # top.png is made before it is used
    made = next(i for i, c in enumerate(commands) if "-o top.png" in c)
    assert made < min(i for i, c in enumerate(commands) if "@top.png" in c or " top.png " in c)


@pytest.fixture(scope="module")
def shipped_server():
    with serving(ROOT / "model_store") as url:
        yield url


def test_every_readme_command_that_talks_to_a_server_runs_as_written(shipped_server, tmp_path):
    # The OpenAI SDK example (Python, not run here) writes sneaker.png and mask.png, which a curl line uses.
    (tmp_path / "sneaker.png").write_bytes((ROOT / "app/server/static/examples/fashion-test-9.png").read_bytes())
    mask = Image.new("RGBA", (28, 28))
    mask.putdata([(0, 0, 0, 255 if i < 14 * 28 + 10 else 0) for i in range(28 * 28)])
    mask.save(tmp_path / "mask.png")
    # curl as written, except that an HTTP error status fails the command (it prints the error body)
    prelude = 'curl() { command curl --fail-with-body --max-time 120 "$@"; }\nset -o pipefail\n'
    commands = server_commands(README.read_text())
    assert len(commands) >= 15
    for command in commands:
        run = ADDRESS.sub(shipped_server, command)
        done = subprocess.run(["bash", "-c", prelude + run], cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, (
            f"{command}\n-> exit {done.returncode}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
        )
    assert Image.open(tmp_path / "bag.png").size == (224, 224)
