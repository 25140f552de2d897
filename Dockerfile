# syntax=docker/dockerfile:1
# infinity-serve image. GPU (default):
#   docker build -t infinity-serve .
# CPU variant, serving the embedded default model:
#   docker build -t infinity-serve:cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm --build-arg VARIANT=cpu .
# Weights are never baked in: mount them at /weights and point INFINITY_TRANSFORMER etc. there.
ARG BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

FROM ${BASE_IMAGE}
ARG VARIANT=gpu
# flash-attn: 1 builds it (needs the CUDA devel image and time) or installs a wheel given by FLASH_ATTN_WHEEL.
ARG INSTALL_FLASH_ATTN=0
ARG FLASH_ATTN_WHEEL=""

# INFINITY_HOST=0.0.0.0: the container's own interface, so a published port reaches it. The server then
# refuses to start without INFINITY_API_KEYS, unless INFINITY_ALLOW_UNAUTHENTICATED=true is passed on
# purpose (`docker run -p 127.0.0.1:8000:8000 ...` for a local try-out); the image never sets it.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    INFINITY_HOST=0.0.0.0 \
    INFINITY_PORT=8000 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY model ./model
COPY weights ./weights
COPY server ./server
COPY training ./training
# The project itself is installed (its pyproject pins what matters); hence DL3013 is ignored here.
# hadolint ignore=DL3013
RUN if [ "$VARIANT" = "cpu" ]; then pip install -c constraints-cpu.txt --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple . ; else pip install . ; fi \
    && if [ -n "$FLASH_ATTN_WHEEL" ]; then pip install "$FLASH_ATTN_WHEEL"; \
       elif [ "$INSTALL_FLASH_ATTN" = "1" ]; then pip install '.[gpu]' --no-build-isolation; fi \
    && useradd --create-home --uid 10001 infinity \
    && mkdir -p /weights && chown infinity /weights

USER 10001
VOLUME ["/weights"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/healthz"]
ENTRYPOINT ["infinity-serve"]
CMD ["serve"]
