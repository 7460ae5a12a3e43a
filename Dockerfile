# syntax=docker/dockerfile:1
# terarec image: the `terarec` CLI, the control plane and a Ray node in one image.
#   docker build -t terarec:0.1.0-cpu .                           # CPU torch
#   docker build --build-arg VARIANT=cuda -t terarec:0.1.0-cuda .  # CUDA torch + .[gpu]
# The Helm chart (helm/terarec) runs it as the control plane and as KubeRay head/worker pods.

ARG VARIANT=cpu

# --- base images, one per variant; `base` picks one by VARIANT ---------------
FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    TERAREC_EXTRAS=""

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS base-cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true)
ENV TORCH_INDEX_URL="" \
    TERAREC_EXTRAS="[gpu]"

# `base` is a stage of this file, not an image to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# --- build: a virtual environment holding terarec and its dependencies -------
FROM base AS build
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY . .
# CPU: torch comes from the PyTorch CPU index first, so pip keeps it (no CUDA wheels).
# hadolint ignore=DL3013
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch; \
    fi \
 && pip install --no-cache-dir ".${TERAREC_EXTRAS}"

# --- runtime: the venv, a non-root user (uid 1000), nothing else -------------
FROM base AS runtime
# The profile.d line keeps the venv on PATH in login shells (KubeRay starts Ray with `bash -lc`).
# hadolint ignore=SC2016
RUN useradd --uid 1000 --user-group --create-home --shell /bin/bash terarec \
 && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/terarec.sh
COPY --from=build /opt/venv /opt/venv
USER 1000
WORKDIR /home/terarec
# control plane, Ray Serve, Ray dashboard, GCS, Ray client
EXPOSE 8080 8000 8265 6379 10001
ENTRYPOINT ["terarec"]
CMD ["--help"]
