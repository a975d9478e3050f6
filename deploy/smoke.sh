#!/usr/bin/env bash
# Container smoke test: build the image, start the compose stack (the gateway and SMOKE_REPLICAS replicas),
# check it through the gateway, restart a replica and check again, print a summary, and remove what it
# started (containers, network, the podman API service, the untagged images its builds left behind).
#
#   deploy/smoke.sh                  # from anywhere; 3-8 minutes on 2 cores, most of it the build (the
#                                    # first run also makes the offline base images: about 4 more)
#
# Needs docker-compose (Debian's 1.29), curl, python3, and podman (with runc and debootstrap) or Docker. With podman, the route of
# deploy/README.md: runc and explicit ulimits in a CONTAINERS_CONF, compose against `podman system
# service`, and when no image registry answers, base images made offline: a debootstrapped Debian, the
# Python base of deploy/python-base.Dockerfile and the nginx gateway of deploy/nginx.Dockerfile.
# Settings (environment): SMOKE_ENGINE (podman or docker; default podman when installed), SMOKE_PORT
# (gateway port on the host, 18088), SMOKE_REPLICAS (2), SMOKE_WHEELS (a folder of wheels for the build,
# default /opt/wheels when it exists), SMOKE_DEBIAN_MIRROR (default: the first one apt uses),
# SMOKE_KEEP_IMAGES (1, the default: keep the tagged images for the next run; 0: remove them too),
# SMOKE_PREFLIGHT_ONLY (1: check the prerequisites, then stop).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENGINE=${SMOKE_ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
PORT=${SMOKE_PORT:-18088}
REPLICAS=${SMOKE_REPLICAS:-2}
WHEELS=${SMOKE_WHEELS-}
if [ -z "${SMOKE_WHEELS+set}" ] && [ -d /opt/wheels ]; then WHEELS=/opt/wheels; fi
KEEP_IMAGES=${SMOKE_KEEP_IMAGES:-1}
PROJECT=pcsmoke
IMAGE=localhost/pixelcnn-server:cpu
GATEWAY=http://127.0.0.1:$PORT
STARTED=$(date +%s)
WORK=$(mktemp -d /tmp/pixelcnn-smoke.XXXXXX)
SERVICE_PID=
COMPOSE_UP=0

log() { printf '[smoke %4ss] %s\n' "$(($(date +%s) - STARTED))" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
compose() { docker-compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }

cleanup() {
    local status=$?
    if [ "$COMPOSE_UP" = 1 ]; then
        [ "$status" = 0 ] || compose logs --no-color --tail 40 >&2 || true
        log "removing the containers and the network"
        compose down --remove-orphans --timeout 45 >/dev/null 2>&1 || log "compose down failed"
    fi
    if [ -n "$SERVICE_PID" ]; then
        kill "$SERVICE_PID" 2>/dev/null || true
        wait "$SERVICE_PID" 2>/dev/null || true
    fi
    # Untagged images made by this run's builds (a multi-stage build keeps its builder stage: ~1.4 GB).
    if [ -f "$WORK/images-before" ]; then
        "$ENGINE" images -qa --no-trunc --filter dangling=true | sort -u > "$WORK/images-after"
        comm -13 "$WORK/images-before" "$WORK/images-after" | xargs -r "$ENGINE" rmi -f >/dev/null 2>&1 || true
    fi
    if [ "$KEEP_IMAGES" = 0 ]; then
        "$ENGINE" rmi -f "$IMAGE" localhost/pixelcnn-base:bookworm localhost/pixelcnn-nginx:bookworm \
            localhost/debian:bookworm-local >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'log "FAILED at line $LINENO: $BASH_COMMAND"' ERR

# --- prerequisites, all checked before anything starts ----------------------------------------------------
# debootstrap is needed on the offline route (podman, no image registry, no base image made earlier);
# whether a registry answers is only known later, so it is required unless a base image is already here.
missing=()
for tool in "$ENGINE" docker-compose curl python3; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ "$ENGINE" = podman ] && command -v podman >/dev/null \
        && ! podman image exists localhost/debian:bookworm-local 2>/dev/null \
        && ! podman image exists docker.io/library/python:3.11-slim-bookworm 2>/dev/null; then
    command -v debootstrap >/dev/null || missing+=(debootstrap)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    fail "missing prerequisites: ${missing[*]}. On Debian: apt-get install -y podman buildah runc debootstrap \
docker-compose curl python3 (debootstrap makes the base images when no image registry answers)"
fi
if [ "${SMOKE_PREFLIGHT_ONLY:-0}" = 1 ]; then log "prerequisites: all there"; exit 0; fi
if [ "$ENGINE" = podman ]; then
    # runc: crun fails on the hybrid cgroups of such machines; nproc above 4096 is refused there.
    printf '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n[engine]\nruntime = "runc"\n' \
        > "$WORK/containers.conf"
    export CONTAINERS_CONF=$WORK/containers.conf
fi
"$ENGINE" images -qa --no-trunc --filter dangling=true | sort -u > "$WORK/images-before"

# --- base images: from the registry, or made offline ------------------------------------------------------
build_args=()
if "$ENGINE" image inspect docker.io/library/python:3.11-slim-bookworm >/dev/null 2>&1 \
        || timeout 60 "$ENGINE" pull -q docker.io/library/python:3.11-slim-bookworm >/dev/null 2>&1; then
    log "base image python:3.11-slim-bookworm from the registry; gateway image ${GATEWAY_IMAGE:-nginx:1.27-alpine}"
else
    log "no image registry: making the base images offline from a debootstrapped Debian"
    [ "$ENGINE" = podman ] || fail "the offline route needs podman (podman import, podman build -v)"
    if ! podman image exists localhost/debian:bookworm-local; then
        command -v debootstrap >/dev/null || fail "debootstrap is not installed (apt-get install -y debootstrap)"
        mirror=${SMOKE_DEBIAN_MIRROR:-$(grep -hoE '^(URIs:|deb) *https?://[^ ]+' /etc/apt/sources.list \
            /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2; exit}' || true)}
        mirror=${mirror:-http://deb.debian.org/debian}
        log "debootstrap bookworm from $mirror"
        debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
        tar -C "$WORK/rootfs" -c . | podman import -q - localhost/debian:bookworm-local >/dev/null
        rm -rf "$WORK/rootfs"
    fi
    podman build -q --pull=never -f "$ROOT/deploy/python-base.Dockerfile" -t localhost/pixelcnn-base:bookworm \
        "$ROOT/deploy" >/dev/null
    podman build -q --pull=never -f "$ROOT/deploy/nginx.Dockerfile" -t localhost/pixelcnn-nginx:bookworm \
        "$ROOT/deploy" >/dev/null
    build_args+=(--pull=never --build-arg BASE_IMAGE=localhost/pixelcnn-base:bookworm)
    export GATEWAY_IMAGE=${GATEWAY_IMAGE:-localhost/pixelcnn-nginx:bookworm}
fi

# --- the server image ---------------------------------------------------------------------------------------
if [ "$ENGINE" = podman ]; then
    # --format docker keeps the HEALTHCHECK (the OCI format drops it).
    build_args+=(--format docker)
    if [ -n "$WHEELS" ]; then
        build_args+=(-v "$WHEELS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg TORCH_INDEX_URL=)
    fi
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then  # the host's CA bundle (a TLS-intercepting proxy)
        build_args+=(-v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro --build-arg PIP_CERT=/host-ca.crt)
    fi
fi
log "building $IMAGE"
build_started=$(date +%s)
"$ENGINE" build "${build_args[@]}" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; fail "image build"; }
build_s=$(($(date +%s) - build_started))
image_mb=$(( $("$ENGINE" image inspect "$IMAGE" --format '{{.Size}}') / 1000000 ))
log "built in ${build_s} s: $image_mb MB"

# --- the compose stack --------------------------------------------------------------------------------------
if [ "$ENGINE" = podman ]; then
    podman system service --time=0 "unix://$WORK/podman.sock" >"$WORK/podman-service.log" 2>&1 &
    SERVICE_PID=$!
    export DOCKER_HOST=unix://$WORK/podman.sock
    for _ in $(seq 100); do [ -S "$WORK/podman.sock" ] && break; sleep 0.1; done
    [ -S "$WORK/podman.sock" ] || fail "podman system service did not start"
fi
log "docker-compose up: the gateway and $REPLICAS replicas"
up_started=$(date +%s)
COMPOSE_UP=1
GATEWAY_PORT=$PORT compose up -d --no-build --scale "pixelcnn=$REPLICAS" >"$WORK/up.log" 2>&1 \
    || { cat "$WORK/up.log" >&2; fail "docker-compose up"; }

ready_code=
for _ in $(seq 240); do
    ready_code=$(curl -s -o "$WORK/ready.json" -w '%{http_code}' "$GATEWAY/ready" || true)
    [ "$ready_code" = 200 ] && break
    sleep 0.5
done
[ "$ready_code" = 200 ] || fail "/ready through the gateway answered ${ready_code:-nothing}: $(cat "$WORK/ready.json" 2>/dev/null)"
ready_s=$(($(date +%s) - up_started))
log "/ready 200 through the gateway ${ready_s} s after up: $(cat "$WORK/ready.json")"

replica_ids() { compose ps -q pixelcnn; }
replica_ready() {  # id: the replica's own /ready, from inside its container
    "$ENGINE" exec "$1" python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)" \
        >/dev/null 2>&1
}
wait_for_every_replica() {  # the gateway is ready with one replica; the checks below need all of them
    local id waiting
    for _ in $(seq 240); do
        waiting=0
        for id in $(replica_ids); do replica_ready "$id" || waiting=$((waiting + 1)); done
        [ "$waiting" = 0 ] && [ "$(replica_ids | wc -l)" = "$REPLICAS" ] && break
        sleep 0.5
    done
    [ "$waiting" = 0 ] || fail "$waiting replica(s) not ready after 2 minutes"
    # nginx marks a replica that refused it (still loading) down for fail_timeout (5 s); gateway.sh looks
    # the names up every 5 s: past both, every replica gets requests.
    sleep 6
}
wait_for_every_replica
log "every replica answers /ready itself"

# Requests reach every replica (counted in each replica's own access log); this also warms them up:
# a replica's first decodes run slower while TorchScript profiles the row loop.
sample_counts() {  # [since]: only log lines after that time
    local id
    for id in $(replica_ids); do
        "$ENGINE" logs ${1:+--since "$1"} "$id" 2>&1 \
            | grep -c '"route": "/sample", "path": "/sample", "status": 200' || true
    done | paste -sd' '
}
burst() {  # [requests] [images each]: concurrent /sample requests through the gateway
    local k pids=()
    for k in $(seq "${1:-12}"); do
        curl -sf -o /dev/null -H 'Content-Type: application/json' -d "{\"n\": ${2:-4}, \"seed\": $k}" \
            "$GATEWAY/sample" &
        pids+=($!)
    done
    for k in "${pids[@]}"; do wait "$k" || return 1; done
}
burst 2 64 || fail "two /sample requests of 64 images (least_conn sends one to each of two replicas)"
burst || fail "a burst of 12 /sample requests through the gateway"
counts_before=$(sample_counts)
log "answered /sample per replica: $counts_before"
for count in $counts_before; do [ "$count" -gt 0 ] || fail "a replica got no request: $counts_before"; done
[ "$(wc -w <<<"$counts_before")" = "$REPLICAS" ] || fail "expected $REPLICAS replicas, found: $counts_before"

# A streamed /sample through the gateway: every row as its own event, the first long before `done`.
stream_times=$(python3 - "$PORT" <<'EOF'
import http.client, json, sys, time
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=120)
started = time.perf_counter()
connection.request("POST", "/sample", body=json.dumps({"n": 64, "seed": 1, "stream": True}),
                   headers={"Content-Type": "application/json"})
response = connection.getresponse()
assert response.status == 200, response.read()
rows, first_row_s, done_s = 0, None, None
for raw in response:
    line = raw.decode().strip()
    if line == "event: row":
        rows += 1
        first_row_s = first_row_s or time.perf_counter() - started
    elif line == "event: done":
        done_s = time.perf_counter() - started
        break
assert rows == 28 and done_s is not None, (rows, done_s)
assert first_row_s < done_s / 4, f"rows were held back: first {first_row_s:.3f} s, done {done_s:.3f} s"
print(f"{first_row_s:.3f} {done_s:.3f}")
EOF
) || fail "streamed /sample through the gateway"
read -r first_row_s done_s <<<"$stream_times"
log "stream of 64 images through the gateway: first row after $first_row_s s, done after $done_s s"

# /complete with curl, answered as a PNG.
curl -sf -H 'Content-Type: application/json' -H 'Accept: image/png' -d '{"n": 1, "seed": 2}' \
    "$GATEWAY/sample" -o "$WORK/top.png" || fail "/sample as PNG"
complete=$(curl -s -F image=@"$WORK/top.png" -F rows=14 -H 'Accept: image/png' -o "$WORK/done.png" \
    -w '%{http_code} %{content_type}' "$GATEWAY/complete")
[ "$complete" = "200 image/png" ] || fail "/complete answered $complete"
[ "$(head -c 4 "$WORK/done.png" | od -An -c | tr -d ' ')" = '211PNG' ] || fail "/complete did not return a PNG"
log "/complete through the gateway: 200, a $(stat -c %s "$WORK/done.png")-byte PNG"

# Restart a replica (SIGTERM: it drains, then starts again): requests meanwhile still succeed (nginx
# passes the drain's 503s and the refused connections on), and afterwards both replicas serve again. The
# restarted one may come back at a new address (podman gives it one): deploy/gateway.sh then reloads nginx.
restarted=$(replica_ids | tail -1)
address() { "$ENGINE" inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }
address_before=$(address "$restarted")
"$ENGINE" restart -t 45 "$restarted" >/dev/null &
restart_pid=$!
burst || fail "requests through the gateway while a replica restarts"
wait "$restart_pid" || fail "$ENGINE restart"
address_after=$(address "$restarted")
if [ "$address_before" != "$address_after" ]; then
    log "the restarted replica moved from $address_before to $address_after"
fi
wait_for_every_replica
restarted_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
sleep 1
burst || fail "a burst after the restart"
burst || fail "a second burst after the restart"
counts_after=$(sample_counts "$restarted_at")
log "after restarting one replica ($address_before -> $address_after): answered /sample per replica: $counts_after"
for count in $counts_after; do [ "$count" -gt 0 ] || fail "a replica got no request after the restart: $counts_after"; done
if [ "$address_before" != "$address_after" ]; then
    reloads=$(compose logs --no-color gateway 2>&1 | grep -c 'reloading nginx' || true)
    [ "$reloads" -gt 0 ] || fail "the replica moved but the gateway did not reload"
    log "the gateway reloaded nginx for the new address ($reloads reload(s))"
fi

total_s=$(($(date +%s) - STARTED))
printf '\nSMOKE TEST PASSED (%s, %s replicas behind %s)\n' "$ENGINE" "$REPLICAS" "${GATEWAY_IMAGE:-nginx:1.27-alpine}"
printf '  image %s: %s MB, built in %s s\n' "$IMAGE" "$image_mb" "$build_s"
printf '  /ready 200 through the gateway %s s after docker-compose up\n' "$ready_s"
printf '  stream of 64 images through the gateway: first row %s s, done %s s\n' "$first_row_s" "$done_s"
printf '  /sample answered per replica: %s; after restarting one (%s -> %s): %s\n' "$counts_before" \
    "$address_before" "$address_after" "$counts_after"
printf '  total %s s (cleanup follows)\n' "$total_s"
