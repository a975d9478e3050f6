#!/bin/sh
# The gateway container's command (docker-compose.yml): nginx with deploy/nginx.conf, reloaded whenever
# the addresses behind the replicas' service name change.
#
# nginx 1.22 resolves `server pixelcnn:8000` only when it loads its configuration, and a replica does not
# keep its address: podman gave a restarted replica a new one (deploy/smoke.sh), Docker may too, and
# `--scale` adds or removes addresses. So this looks the name up every RESOLVE_EVERY_S seconds (5) and
# runs `nginx -s reload` when the set differs: the new workers see the new set, the old ones finish their
# open requests and streams first. With nginx >= 1.27.3, `server pixelcnn:8000 resolve;` and a
# `resolver` would do this inside nginx. SIGQUIT or SIGTERM stops nginx gracefully (open streams finish).
set -eu

CONF=${GATEWAY_CONF:-/etc/nginx/pixelcnn.conf}
SERVICE=${GATEWAY_UPSTREAM_NAME:-pixelcnn}
EVERY=${RESOLVE_EVERY_S:-5}

addresses() {
    getent ahostsv4 "$SERVICE" 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' '
}

nginx -c "$CONF" -g 'daemon off;' &
nginx_pid=$!
trap 'kill -QUIT "$nginx_pid" 2>/dev/null; wait "$nginx_pid"; exit 0' QUIT TERM INT

known=$(addresses)
echo "gateway: $SERVICE is ${known:-not resolvable yet}" >&2
while kill -0 "$nginx_pid" 2>/dev/null; do
    sleep "$EVERY" &
    wait $! || true  # a signal interrupts the wait at once, and the trap runs
    now=$(addresses)
    if [ -n "$now" ] && [ "$now" != "$known" ]; then
        echo "gateway: $SERVICE moved from ${known:-nothing} to $now: reloading nginx" >&2
        nginx -c "$CONF" -s reload && known=$now
    fi
done
wait "$nginx_pid"
