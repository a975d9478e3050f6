# Offline stand-in for the gateway image (nginx:1.27-alpine in docker-compose.yml): Debian bookworm's
# nginx 1.22, for machines that reach Debian mirrors but no image registry. deploy/smoke.sh builds it
# from the same debootstrapped Debian as deploy/python-base.Dockerfile:
#   podman build --pull=never -f deploy/nginx.Dockerfile -t localhost/pixelcnn-nginx:bookworm deploy/
# and runs compose with GATEWAY_IMAGE=localhost/pixelcnn-nginx:bookworm. The configuration is mounted
# by compose (deploy/nginx.conf), not baked in.
ARG DEBIAN_IMAGE=localhost/debian:bookworm-local
FROM ${DEBIAN_IMAGE}

# DL3008 (pin apt versions): a throwaway local stand-in; exact Debian revisions change with every
# bookworm point release and would break this build, while the real gateway image is pinned by tag.
# The default site is removed: compose runs nginx with -c /etc/nginx/pixelcnn.conf only.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default

EXPOSE 8080
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
