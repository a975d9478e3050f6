# Offline stand-in for python:3.11-slim-bookworm, for machines that reach Debian and PyPI mirrors but no
# image registry. Build it from a debootstrapped Debian (see deploy/README.md), then pass it to the main
# Dockerfile with --build-arg BASE_IMAGE=localhost/pixelcnn-base:bookworm.
# Debian bookworm's python3 is 3.11, the same minor version (and wheel tag, cp311) as the real base.
ARG DEBIAN_IMAGE=localhost/debian:bookworm-local
FROM ${DEBIAN_IMAGE}

# DL3008 (pin apt versions): a throwaway local test base; exact Debian revisions change with every
# bookworm point release and would break this build, while the real base image is pinned by tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python
