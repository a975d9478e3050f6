"""The repository's gateway (deploy/nginx.conf) run on this machine in front of `pixelcnn serve` replicas
on loopback: used by `pixelcnn bench scale` and tests/test_gateway.py, so both exercise the file that
compose ships rather than a copy of it.

`render_gateway_config` rewrites only where the replicas are, where nginx listens and where it writes
(pid, logs, temp files); every directive that decides behaviour (least_conn, max_fails, retries,
buffering, timeouts, body size) is the shipped file's. `Replica` and `Gateway` start the processes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .servers import free_port

NGINX_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _replace_once(pattern: str, replacement, text: str) -> str:
    """re.sub that insists on exactly one match: a renamed directive fails here, not silently later."""
    result, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise ValueError(f"{NGINX_CONF.name}: expected one line matching {pattern!r}, found {count}")
    return result


def render_gateway_config(conf: str, upstreams: list[str], listen: str, workdir: Path) -> str:
    """`conf` (the text of deploy/nginx.conf) with `server pixelcnn:8000 ...;` repeated for each of
    `upstreams` ("127.0.0.1:PORT", same parameters), `listen 8080` replaced by `listen`, and the pid
    file, the logs and the temp paths moved under `workdir`."""
    if not upstreams:
        raise ValueError("the gateway needs at least one upstream")

    def servers(match: re.Match) -> str:
        indent, parameters = match[1], match[2]
        return "\n".join(f"{indent}server {address}{parameters};" for address in upstreams)

    text = _replace_once(r"^(\s*)server pixelcnn:8000([^;]*);", servers, conf)
    text = _replace_once(r"^(\s*)listen 8080;", rf"\g<1>listen {listen};", text)
    text = _replace_once(r"^pid [^;]+;", f"pid {workdir / 'nginx.pid'};", text)
    text = _replace_once(r"^error_log /dev/stderr", f"error_log {workdir / 'error.log'}", text)
    text = _replace_once(r"^(\s*)access_log /dev/stdout", rf"\g<1>access_log {workdir / 'access.log'}", text)
    for kind in TEMP_PATHS:
        text = _replace_once(rf"^(\s*){kind}_temp_path [^;]+;", rf"\g<1>{kind}_temp_path {workdir / kind};", text)
    return text


def wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} within {timeout_s:.0f} s: {log.read_text()[-2000:]}")


class Replica:
    """One `pixelcnn serve` process on a free loopback port, one lane (or `lanes`) and one torch thread, pinned to
    `cpu` with taskset when given; its log goes to a file (a pipe nobody reads would block it)."""

    def __init__(
        self,
        store: Path,
        workdir: Path,
        cpu: int | None = None,
        env: dict[str, str] | None = None,
        model: str | None = None,
        lanes: int = 1,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = workdir / f"replica-{self.port}.log"
        command = [
            sys.executable,
            "-m",
            "app.cli",
            "serve",
            "--model-store",
            str(store),
            "--port",
            str(self.port),
            "--lanes",
            str(lanes),
            "--threads",
            "1",
            "--device",
            "cpu",
            *(["--model", model] if model else []),
        ]
        if cpu is not None:
            command = [require_tool("taskset", "util-linux"), "-c", str(cpu), *command]
        self.command, self.env = command, {**os.environ, **(env or {})}
        self.process = self._start("w")

    def _start(self, mode: str) -> subprocess.Popen:
        with self.log_path.open(mode) as log:
            return subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def restart(self) -> Replica:
        """A new process on the same port (the gateway's upstream), its log appended; call wait_ready."""
        self.stop()
        self.process = self._start("a")
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> Replica:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica on :{self.port} exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"replica on :{self.port} was not ready in {timeout_s:.0f} s: {self.log_path.read_text()[-2000:]}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install -y {package})")
    return path


class Gateway:
    """deploy/nginx.conf rendered for `upstreams` and run by nginx (`nginx -p DIR -c DIR/nginx.conf`)
    on a free loopback port; `access_log` is its access log (one line per request, see log_format).
    DIR is a fresh folder of its own, removed on stop: nginx's workers run as nobody when the master is
    root, and must reach its temp folders (a folder below a private one would not do)."""

    def __init__(self, upstreams: list[str], cpu: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="pixelcnn-gateway-"))
        self.dir.chmod(0o755)
        self.access_log = self.dir / "access.log"
        conf = self.dir / "nginx.conf"
        conf.write_text(render_gateway_config(NGINX_CONF.read_text(), upstreams, f"127.0.0.1:{self.port}", self.dir))
        command = [
            require_tool("nginx", "nginx"),
            "-p",
            str(self.dir),
            "-c",
            str(conf),
            "-e",
            str(self.dir / "error.log"),
            "-g",
            "daemon off;",
        ]
        if cpu is not None:
            command = [require_tool("taskset", "util-linux"), "-c", str(cpu), *command]
        self.stderr_path = self.dir / "stderr.log"
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(command, stdout=stderr, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, self.process, "nginx", self.stderr_path)
        except RuntimeError:
            self.stop()
            raise

    def log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # fast shutdown: workers close their connections
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
