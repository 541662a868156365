# syntax=docker/dockerfile:1
# The Associated Learning service image: `al serve` (API + embedded worker) by default,
# `al worker` for separate workers (see docker-compose.yml and docs/deploy.md).
#
#   CPU (default):  docker build -t associated-learning:cpu .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu126 -t associated-learning:cuda .
#
# TORCH_VARIANT names the PyTorch wheel index: cpu, cu126, cu128, ... (https://download.pytorch.org/whl/<variant>).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment with torch and the project ---------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install --upgrade pip
# torch first, from the variant's own index, so that `pip install .` finds it satisfied and
# never pulls a CUDA build into the CPU image (this layer is cached across source changes).
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY . /src
RUN pip install . \
 && python -c "import torch; print('torch', torch.__version__)"

# ---- runtime: the venv only, run as a non-root user -------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="associated-learning" \
      org.opencontainers.image.description="Associated Learning training-and-inference service" \
      ai.associated-learning.torch-variant="${TORCH_VARIANT}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AL_DATA_DIR=/data
RUN groupadd --system --gid 10001 al \
 && useradd --system --uid 10001 --gid al --create-home --home-dir /home/al --shell /usr/sbin/nologin al \
 && mkdir -p /data \
 && chown al:al /data
COPY --from=build /opt/venv /opt/venv
USER al
WORKDIR /home/al
# Uploads, checkpoints, models and the embedded store; owned by `al`, so a fresh named
# volume mounted here starts out writable by the service.
VOLUME ["/data"]
EXPOSE 8000
# For `al serve`; compose overrides it for workers, which listen on no port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
CMD ["al", "serve", "--host", "0.0.0.0", "--port", "8000"]
