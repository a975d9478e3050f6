# PixelCNN model server image. CPU build (default):
#   docker build -t pixelcnn-server .
# CUDA build (torch wheel from the CUDA index; the host needs the NVIDIA driver and container toolkit):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t pixelcnn-server:cuda .
# Offline/podman builds (local wheels, extra CA bundle, stand-in base image): see deploy/README.md.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- builder: a virtual environment with the server and its dependencies ----
FROM ${BASE_IMAGE} AS builder

# Extra index for torch: CPU wheels by default; .../whl/cu128 for a CUDA image; empty: PyPI only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional, empty by default (pip ignores empty settings): a folder of local wheels and a CA bundle,
# both mounted into the build by the caller (e.g. podman build -v /opt/wheels:/wheels:ro).
ARG PIP_FIND_LINKS=
ARG PIP_CERT=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /srv

# Dependencies first (from pyproject.toml only), so code changes do not reinstall torch.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY app/ ./app/
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import app.server.app, torch; print('torch', torch.__version__)"

# Models last (they change most often). safetensors writes weights with mode 0600; make them readable
# for the unprivileged runtime user here, so the runtime stage needs no extra chmod layer.
COPY model_store/ ./model_store/
RUN chmod -R a+rX,go-w ./model_store

# ---- runtime: the venv, the model store and an unprivileged user ----
FROM ${BASE_IMAGE}

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIXELCNN_HOST=0.0.0.0 \
    PIXELCNN_PORT=8000 \
    PIXELCNN_MODEL_STORE=/srv/model_store \
    PIXELCNN_KERNEL_CACHE=/tmp/pixelcnn-kernels \
    MALLOC_ARENA_MAX=2

# MALLOC_ARENA_MAX: glibc gives each new thread (the decode lanes, the worker threads that encode PNGs) an
# arena of its own, up to 8 per core, and keeps what each has held; capped, a replica's resident memory
# settles within minutes instead of creeping up for an hour as new threads take new arenas.

# A C compiler: the sampler builds its per-pixel kernel for this CPU at first start (app/engine/c_kernel.py,
# about a second, into PIXELCNN_KERNEL_CACHE); without one it runs the slower TorchScript decoder.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 pixelcnn \
    && useradd --uid 10001 --gid pixelcnn --home-dir /srv --no-create-home --shell /usr/sbin/nologin pixelcnn

COPY --from=builder /opt/venv /opt/venv
WORKDIR /srv
# The package (app/) is installed in the venv; the models stay root-owned, read-only for the server.
COPY --from=builder /srv/model_store ./model_store/

# Numeric ids, so that runtimes (e.g. Kubernetes runAsNonRoot) can tell the user is not root.
USER 10001:10001
EXPOSE 8000

# Liveness only (/health is 200 as soon as the process serves); /ready says whether models are loaded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PIXELCNN_PORT', '8000') + '/health', timeout=4)"]

CMD ["pixelcnn", "serve"]
